#!/usr/bin/env bash
# The whole benchmark table (issue 7, issue 3): vdisk against qemu-img, side by side, on the
# 4 GiB mixed disk of gen_disk.py, one row per operation, alternating which tool goes first,
# with the machine's floor for each row measured in the same rounds.
#
# Usage: bench/table.sh [RUNS]          (default 5 rounds of every row)
#
# Env:   BENCH_DIR (default /tmp/vdisk-bench), SIZE_GIB (default 4), SEED (default 20261126),
#        VDISK (default: target/release/vdisk, built here and copied to BENCH_DIR so a rebuild
#        by someone else during the run changes nothing), NO_BUILD=1 skips the build,
#        ROWS="raw-qcow2 check ..." runs only those rows (names: see ALL_ROWS below),
#        LONG_RUNS=N gives the compression rows N rounds instead of RUNS,
#        QUICK_REPS=N repeats each run of the fast query rows (map, info, check) N times inside
#        one timing (default 20), so that 10 ms of timer resolution does not decide the ratio.
#
# Every input is prepared once, untimed, by qemu-img (and qemu-io for the chain) from the raw
# disk, and cached in BENCH_DIR under a name that carries the seed and size.
#
# Per round and row: the previous output is deleted and `sync` runs before every timed run
# (untimed); /usr/bin/time gives wall, user+sys CPU and peak RSS. Convert rows time
# `qemu-img convert` (its default target cache mode is `unsafe`: no fsync) against
# `vdisk convert -t unsafe` (like for like), and for the uncompressed rows also vdisk's own
# default (writeback plus one fdatasync at the end). In the first round every output is
# checked: `qemu-img compare` against what it was converted from, `qemu-img check` of qcow2
# and VMDK outputs, and for check/compare/map/info the two tools' stdout and exit codes must
# be identical.
#
# Floors, in the same rounds: `cat INPUT > /dev/null` (page-cache read of the row's input) and
# `cp --sparse=always INPUT OUT` for convert rows; for compression rows the compressor itself on
# both cores over the disk's non-zero 64 KiB clusters (what both tools compress), at the level
# qemu uses: `pigz -p 2 -6` (zlib level 6, qcow2 and VMDK) and `zstd -T2 -3` (zstd level 3).
set -euo pipefail

RUNS=${1:-5}
LONG_RUNS=${LONG_RUNS:-$RUNS}
QUICK_REPS=${QUICK_REPS:-20}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/vdisk-bench}
SIZE_GIB=${SIZE_GIB:-4}
SEED=${SEED:-20261126}
ALL_ROWS="raw-qcow2 qcow2-raw raw-qcow2-zlib raw-qcow2-zstd zlib-raw zstd-raw vmdkstream-qcow2 raw-vmdkstream vhdx-raw chain-qcow2 check compare map info"
ROWS=${ROWS:-$ALL_ROWS}

for tool in /usr/bin/time pigz zstd qemu-img qemu-io; do
    if ! command -v "$tool" >/dev/null; then
        case $tool in
            /usr/bin/time) pkg=time ;;
            qemu-img | qemu-io) pkg=qemu-utils ;;
            *) pkg=$tool ;;
        esac
        echo "installing $pkg" >&2
        apt-get install -y "$pkg" >/dev/null
    fi
done

mkdir -p "$BENCH_DIR"
if [ -z "${VDISK:-}" ]; then
    if [ -z "${NO_BUILD:-}" ]; then
        (cd "$ROOT" && cargo build --release -p vdisk-cli >&2)
    fi
    rev=$(cd "$ROOT" && git rev-parse --short HEAD)
    VDISK=$BENCH_DIR/vdisk-$rev
    cp "$ROOT/target/release/vdisk" "$VDISK.tmp" && mv "$VDISK.tmp" "$VDISK"
fi

P=$BENCH_DIR/${SIZE_GIB}g-$SEED
SRC=$BENCH_DIR/src-${SIZE_GIB}g-$SEED.raw
if [ ! -f "$SRC" ]; then
    echo "generating $SRC" >&2
    python3 "$HERE/gen_disk.py" "$SRC" "$SIZE_GIB" "$SEED"
fi

# --- inputs, prepared once by qemu-img (untimed) -------------------------------------------
prep() { # file, then the command that makes it (written to file.tmp, renamed when done)
    local file=$1
    shift
    if [ ! -f "$file" ]; then
        echo "preparing $file" >&2
        rm -f "$file.tmp"
        "$@"
        mv "$file.tmp" "$file"
    fi
}
IN_QCOW2=$P.qcow2
IN_ZLIB=$P-zlib.qcow2
IN_ZSTD=$P-zstd.qcow2
IN_STREAM=$P-stream.vmdk
IN_VHDX=$P-dynamic.vhdx
BASE=$P-chain-base.qcow2
MID=$P-chain-mid.qcow2
TOP=$P-chain-top.qcow2
NONZERO=$P-nonzero-clusters.bin
prep "$IN_QCOW2" qemu-img convert -f raw -O qcow2 "$SRC" "$IN_QCOW2.tmp"
if [[ " $ROWS " == *" zlib-raw "* ]]; then
    prep "$IN_ZLIB" qemu-img convert -c -f raw -O qcow2 "$SRC" "$IN_ZLIB.tmp"
fi
if [[ " $ROWS " == *" zstd-raw "* ]]; then
    prep "$IN_ZSTD" qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$SRC" "$IN_ZSTD.tmp"
fi
prep "$IN_STREAM" qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$SRC" "$IN_STREAM.tmp"
prep "$IN_VHDX" qemu-img convert -f raw -O vhdx -o subformat=dynamic "$SRC" "$IN_VHDX.tmp"
# The chain: base (the raw disk as qcow2) <- mid <- top, each upper layer with writes of
# patterns, zeroes and discards by qemu-io over ranges that overlap the lower layers' data.
# The backing names are relative (the files sit side by side).
make_mid() {
    qemu-img create -q -f qcow2 -b "$(basename "$BASE")" -F qcow2 "$MID.tmp" "${SIZE_GIB}G"
    qemu-io -f qcow2 \
        -c "write -P 0xa1 0 64M" -c "write -P 0xa2 1000M 200M" -c "write -z 1500M 100M" \
        -c "write -P 0xa3 2047M 3M" -c "discard 3000M 50M" -c "write -P 0xa4 3500M 300k" \
        "$MID.tmp" >/dev/null
}
make_top() {
    qemu-img create -q -f qcow2 -b "$(basename "$MID")" -F qcow2 "$TOP.tmp" "${SIZE_GIB}G"
    qemu-io -f qcow2 \
        -c "write -P 0xb1 32M 64M" -c "write -P 0xb2 1100M 10M" -c "write -z 1550M 10M" \
        -c "write -P 0xb3 2500M 150M" -c "write -P 0xb4 3010M 20M" -c "discard 3600M 100M" \
        "$TOP.tmp" >/dev/null
}
make_chain() { # the layers depend on each other: rebuild all three together
    rm -f "$MID" "$TOP"
    qemu-img convert -f raw -O qcow2 "$SRC" "$BASE.tmp" && mv "$BASE.tmp" "$BASE"
    (cd "$BENCH_DIR" && make_mid && mv "$MID.tmp" "$MID" && make_top && mv "$TOP.tmp" "$TOP")
}
[ -f "$TOP" ] || make_chain
# The floor input of the compressors: the 64 KiB clusters of the disk that are not all zero,
# back to back (zero clusters are skipped, not compressed, by both tools).
prep "$NONZERO" python3 - "$SRC" "$NONZERO.tmp" <<'PY'
import os, sys
src, dst = sys.argv[1], sys.argv[2]
C = 64 * 1024
zero = bytes(C)
with open(src, "rb") as f, open(dst, "wb") as out:
    fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        start = data // C * C
        f.seek(start)
        left = (hole + C - 1) // C * C - start
        while left > 0:
            buf = f.read(min(left, 64 * C))
            if not buf:
                break
            for i in range(0, len(buf), C):
                if buf[i:i + C] != zero[: len(buf[i:i + C])]:
                    out.write(buf[i:i + C])
            left -= len(buf)
        pos = (hole + C - 1) // C * C
PY

# --- timing -------------------------------------------------------------------------------
RESULTS=$BENCH_DIR/table-results.txt
CHECKS=$BENCH_DIR/table-checks.txt
: > "$RESULTS"
: > "$CHECKS"
OUT=$BENCH_DIR/out.img

# timed ROW LABEL REPS CMD...: one timed run (REPS calls of CMD in one timing), after deleting
# the previous output and a sync. Records per-call wall and CPU, peak RSS and output blocks.
timed() {
    local row=$1 label=$2 reps=$3
    shift 3
    rm -f "$OUT"
    sync
    local rc=0
    if [ "$reps" -eq 1 ]; then
        /usr/bin/time -f "%e %M %U %S" -o "$BENCH_DIR/time.txt" "$@" >/dev/null || rc=$?
    else
        /usr/bin/time -f "%e %M %U %S" -o "$BENCH_DIR/time.txt" \
            sh -c 'n=$1; shift; for i in $(seq "$n"); do "$@" >/dev/null || exit $?; done' \
            sh "$reps" "$@" || rc=$?
    fi
    local secs rss user sys
    read -r secs rss user sys < <(tail -n 1 "$BENCH_DIR/time.txt")
    echo "$row $label $secs $rss $(stat -c %b "$OUT" 2>/dev/null || echo 0) $user $sys $reps $rc" >> "$RESULTS"
}

note() { echo "$*" | tee -a "$CHECKS" >&2; }

# verify_out ROW LABEL REF REFFMT OUTFMT: the output must equal REF; qcow2/VMDK must check clean.
verify_out() {
    local row=$1 label=$2 ref=$3 reffmt=$4 outfmt=$5
    if qemu-img compare -q -f "$reffmt" -F "$outfmt" "$ref" "$OUT"; then
        note "ok $row $label: qemu-img compare equal"
    else
        note "MISMATCH $row $label: output differs from $ref"
    fi
    case $outfmt in
        qcow2 | vmdk)
            if qemu-img check -q -f "$outfmt" "$OUT"; then
                note "ok $row $label: qemu-img check clean"
            else
                note "CHECK-FAIL $row $label: qemu-img check -f $outfmt reports problems"
            fi
            ;;
    esac
}

# rotate ROUND TOOLS...: prints the tools rotated by ROUND (which goes first changes each round).
rotate() {
    local i=$1
    shift
    local n=$# k
    local a=("$@")
    for ((k = 0; k < n; k++)); do echo "${a[$(((k + i) % n))]}"; done
}

# convert_row ROW RUNS INFMT IN OUTFMT REF REFFMT DEFAULT(0/1) FLOORS -- EXTRA_ARGS...
convert_row() {
    local row=$1 runs=$2 infmt=$3 in=$4 outfmt=$5 ref=$6 reffmt=$7 with_default=$8 floors=$9
    shift 10
    local extra=("$@") tools=(qemu vdisk-unsafe)
    [ "$with_default" -eq 1 ] && tools+=(vdisk-default)
    # The chain's floor reads all three layers and copies the base (the biggest).
    local ffiles=("$in")
    [ "$row" = chain-qcow2 ] && ffiles=("$BASE" "$MID" "$TOP")
    echo "== $row: $runs rounds" >&2
    cat "${ffiles[@]}" > /dev/null
    local i tool
    for ((i = 0; i < runs; i++)); do
        echo "   round $((i + 1))/$runs" >&2
        for tool in $(rotate "$i" "${tools[@]}"); do
            case $tool in
                qemu) timed "$row" qemu-img 1 qemu-img convert -f "$infmt" -O "$outfmt" "${extra[@]}" "$in" "$OUT" ;;
                vdisk-unsafe) timed "$row" vdisk-unsafe 1 "$VDISK" convert -t unsafe -f "$infmt" -O "$outfmt" "${extra[@]}" "$in" "$OUT" ;;
                vdisk-default) timed "$row" vdisk-default 1 "$VDISK" convert -f "$infmt" -O "$outfmt" "${extra[@]}" "$in" "$OUT" ;;
            esac
            if [ "$i" -eq 0 ]; then verify_out "$row" "$tool" "$ref" "$reffmt" "$outfmt"; fi
        done
        run_floors "$row" "$floors" "${ffiles[@]}"
    done
}

# run_floors ROW "floor names" FILES...: the floors of a row, once per round.
run_floors() {
    local row=$1 floors=$2
    shift 2
    local f
    for f in $floors; do
        case $f in
            read) timed "$row" floor-read 1 sh -c 'cat "$@" > /dev/null' sh "$@" ;;
            cp) timed "$row" floor-cp 1 cp --sparse=always "$1" "$OUT" ;;
            pigz) timed "$row" floor-pigz-6 1 sh -c 'pigz -p 2 -6 -c "$1" > /dev/null' sh "$NONZERO" ;;
            zstd) timed "$row" floor-zstd-3 1 sh -c 'zstd -q -T2 -3 -c "$1" > /dev/null' sh "$NONZERO" ;;
        esac
    done
}

# query_row ROW RUNS REPS FLOORS FLOOR_FILES -- ARGS...: `qemu-img ARGS` against `vdisk ARGS`;
# stdout and exit code must be identical (checked once, untimed).
query_row() {
    local row=$1 runs=$2 reps=$3 floors=$4 floor_files=$5
    shift 6
    echo "== $row: $runs rounds x $reps calls" >&2
    # shellcheck disable=SC2086
    cat ${floor_files:-$IN_QCOW2} > /dev/null
    local rq=0 rv=0
    qemu-img "$@" > "$BENCH_DIR/$row.qemu.out" 2>&1 || rq=$?
    "$VDISK" "$@" > "$BENCH_DIR/$row.vdisk.out" 2>&1 || rv=$?
    if [ "$rq" -ne "$rv" ]; then
        note "EXIT-DIFF $row: qemu-img exits $rq, vdisk $rv ($*)"
    elif cmp -s "$BENCH_DIR/$row.qemu.out" "$BENCH_DIR/$row.vdisk.out"; then
        note "ok $row: identical output and exit code $rq"
    else
        note "OUTPUT-DIFF $row: diff $BENCH_DIR/$row.qemu.out $BENCH_DIR/$row.vdisk.out"
    fi
    local i tool
    for ((i = 0; i < runs; i++)); do
        echo "   round $((i + 1))/$runs" >&2
        for tool in $(rotate "$i" qemu vdisk); do
            case $tool in
                qemu) timed "$row" qemu-img "$reps" qemu-img "$@" ;;
                vdisk) timed "$row" vdisk-unsafe "$reps" "$VDISK" "$@" ;;
            esac
        done
        # shellcheck disable=SC2086
        if [ -n "$floors" ]; then run_floors "$row" "$floors" $floor_files; fi
    done
}

echo "vdisk: $VDISK ($(cd "$ROOT" && git rev-parse HEAD)); load average: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$BENCH_DIR/table-meta.txt" >&2
for row in $ROWS; do
    case $row in
        raw-qcow2) convert_row raw-qcow2 "$RUNS" raw "$SRC" qcow2 "$SRC" raw 1 "read cp" -- ;;
        qcow2-raw) convert_row qcow2-raw "$RUNS" qcow2 "$IN_QCOW2" raw "$SRC" raw 1 "read cp" -- ;;
        raw-qcow2-zlib) convert_row raw-qcow2-zlib "$LONG_RUNS" raw "$SRC" qcow2 "$SRC" raw 0 "read pigz" -- -c ;;
        raw-qcow2-zstd) convert_row raw-qcow2-zstd "$LONG_RUNS" raw "$SRC" qcow2 "$SRC" raw 0 "read zstd" -- -c -o compression_type=zstd ;;
        zlib-raw) convert_row zlib-raw "$RUNS" qcow2 "$IN_ZLIB" raw "$SRC" raw 1 "read cp" -- ;;
        zstd-raw) convert_row zstd-raw "$RUNS" qcow2 "$IN_ZSTD" raw "$SRC" raw 1 "read cp" -- ;;
        vmdkstream-qcow2) convert_row vmdkstream-qcow2 "$RUNS" vmdk "$IN_STREAM" qcow2 "$SRC" raw 1 "read cp" -- ;;
        raw-vmdkstream) convert_row raw-vmdkstream "$LONG_RUNS" raw "$SRC" vmdk "$SRC" raw 0 "read pigz" -- -o subformat=streamOptimized ;;
        vhdx-raw) convert_row vhdx-raw "$RUNS" vhdx "$IN_VHDX" raw "$SRC" raw 1 "read cp" -- ;;
        chain-qcow2) convert_row chain-qcow2 "$RUNS" qcow2 "$TOP" qcow2 "$TOP" qcow2 1 "read cp" -- ;;
        check) query_row check "$RUNS" "$QUICK_REPS" "" "" -- check -f qcow2 "$IN_QCOW2" ;;
        compare) query_row compare "$RUNS" 1 "read" "$SRC $IN_QCOW2" -- compare -f raw -F qcow2 "$SRC" "$IN_QCOW2" ;;
        map) query_row map "$RUNS" "$QUICK_REPS" "" "" -- map --output=json -f qcow2 "$IN_QCOW2" ;;
        info) query_row info "$RUNS" "$QUICK_REPS" "" "" -- info --output=json -f qcow2 "$IN_QCOW2" ;;
        *) echo "unknown row $row (rows: $ALL_ROWS)" >&2; exit 2 ;;
    esac
done
rm -f "$OUT"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$BENCH_DIR/table-meta.txt" >&2

python3 "$HERE/table_summary.py" "$RESULTS" "$CHECKS" "$BENCH_DIR/table-meta.txt"
