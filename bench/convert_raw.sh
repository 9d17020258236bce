#!/usr/bin/env bash
# Times `vdisk convert -O raw` against `qemu-img convert -O raw` on a generated 4 GiB raw
# disk, alternating the tools run by run, and prints medians, ratios, peak RSS and the
# machine's floor (page-cache read and a sparse cp of the same bytes).
#
# Usage: bench/convert_raw.sh [RUNS]   (default 5)
#
# "median s" is wall time; "cpu s" is user+system CPU, which varies less when the machine is
# shared. "vs qemu" is the ratio of medians (below 1.00 means vdisk is faster).
# Env:   BENCH_DIR (default /tmp/vdisk-bench), SIZE_GIB (default 4), SEED,
#        VDISK (default target/release/vdisk, built here), NO_BUILD=1 to skip the build.
#
# qemu-img's default target cache mode is `unsafe` (no fsync); vdisk's is writeback with one
# fsync at the end. Both are measured: "vdisk -t unsafe" is the like-for-like comparison,
# "vdisk default" shows what the final fsync costs.
set -euo pipefail

RUNS=${1:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/vdisk-bench}
SIZE_GIB=${SIZE_GIB:-4}
SEED=${SEED:-20261126}
VDISK=${VDISK:-$ROOT/target/release/vdisk}

if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time for peak RSS" >&2
    apt-get install -y time >/dev/null
fi
if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release -p vdisk-cli >&2)
fi

mkdir -p "$BENCH_DIR"
SRC=$BENCH_DIR/src-${SIZE_GIB}g-$SEED.raw
if [ ! -f "$SRC" ]; then
    echo "generating $SRC" >&2
    python3 "$HERE/gen_disk.py" "$SRC" "$SIZE_GIB" "$SEED"
fi
OUT=$BENCH_DIR/out.raw
RESULTS=$BENCH_DIR/results.txt
: > "$RESULTS"

# One timed run: label, then the command. Records seconds and peak RSS (KiB).
timed() {
    local label=$1
    shift
    rm -f "$OUT"
    sync
    /usr/bin/time -f "%e %M %U %S" -o "$BENCH_DIR/time.txt" "$@" >/dev/null
    read -r secs rss user sys < "$BENCH_DIR/time.txt"
    echo "$label $secs $rss $(stat -c %b "$OUT" 2>/dev/null || echo 0) $user $sys" >> "$RESULTS"
}

# Contents must match the source; checked once per configuration.
verify() {
    local label=$1
    if ! qemu-img compare -q -f raw -F raw "$SRC" "$OUT"; then
        echo "MISMATCH: $label output differs from the source" >&2
        exit 1
    fi
}

echo "warming the page cache" >&2
cat "$SRC" > /dev/null

ORDERS=("qemu vdisk_unsafe vdisk_default" "vdisk_unsafe vdisk_default qemu" "vdisk_default qemu vdisk_unsafe")
for i in $(seq 1 "$RUNS"); do
    echo "run $i/$RUNS" >&2
    # Rotate which tool goes first: on a VM, the first big write after a big delete is often
    # slower (freed pages were handed back to the host), and no tool should always pay that.
    order=${ORDERS[$(((i - 1) % 3))]}
    for tool in $order; do
        case $tool in
            qemu) timed "qemu-img" qemu-img convert -f raw -O raw "$SRC" "$OUT" ;;
            vdisk_unsafe) timed "vdisk-unsafe" "$VDISK" convert -t unsafe -f raw -O raw "$SRC" "$OUT" ;;
            vdisk_default) timed "vdisk-default" "$VDISK" convert -f raw -O raw "$SRC" "$OUT" ;;
        esac
        if [ "$i" -eq 1 ]; then verify "$tool"; fi
    done
    # Floor: read the source from the page cache, and a sparse copy of it.
    timed "floor-read" sh -c "cat '$SRC' > /dev/null; : > '$OUT'"
    timed "floor-cp" cp --sparse=always "$SRC" "$OUT"
done

python3 - "$RESULTS" "$SRC" <<'PY'
import os, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, secs, rss, blocks, user, system = line.split()
    rows.setdefault(label, []).append(
        (float(secs), int(rss), int(blocks) * 512, float(user) + float(system)))
src = sys.argv[2]
st = os.stat(src)
print(f"source: {src}: {st.st_size / 2**30:.2f} GiB virtual, {st.st_blocks * 512 / 2**30:.2f} GiB allocated")
qemu = statistics.median(r[0] for r in rows["qemu-img"])
qemu_cpu = statistics.median(r[3] for r in rows["qemu-img"])
print(f"{'command':<15} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'vs qemu':>8} "
      f"{'cpu s':>6} {'cpu vs qemu':>11} {'peak RSS':>10} {'out alloc':>10}")
for label in ["qemu-img", "vdisk-unsafe", "vdisk-default", "floor-cp", "floor-read"]:
    r = rows.get(label)
    if not r:
        continue
    times = [x[0] for x in r]
    med = statistics.median(times)
    cpu = statistics.median(x[3] for x in r)
    rss = max(x[1] for x in r)
    alloc = statistics.median(x[2] for x in r)
    print(f"{label:<15} {len(r):>4} {med:>9.3f} {min(times):>7.3f} {max(times):>7.3f} {med / qemu:>8.2f} "
          f"{cpu:>6.2f} {cpu / qemu_cpu:>11.2f} {rss / 1024:>8.1f}Mi {alloc / 2**30:>8.3f}Gi")
read = statistics.median(x[0] for x in rows["floor-read"])
print("median of min: " + ", ".join(
    f"{k} {min(x[0] for x in rows[k]):.3f}s" for k in ["qemu-img", "vdisk-unsafe", "vdisk-default"]))
print(f"page-cache read speed: {st.st_size / read / 2**30:.2f} GiB/s (cat of the whole file, holes included)")
PY
