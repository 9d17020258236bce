#!/usr/bin/env bash
# Seeds the corpora of the cargo-fuzz targets from real images and runs each target in turn.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS (default 300) is the run time of each target; TARGETs default to all six.
# FUZZ_SANITIZER=none builds without the address sanitizer (see README.md).
# Seeds are made fresh on every run (qemu-img/qemu-io images and the shared fixtures) and
# copied into corpus/<target>/; nothing here is committed (see .gitignore).
set -euo pipefail

secs=${1:-300}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
all=(qcow2 vhdx vmdk_descriptor vmdk_image luks_header qcow2_snapshot_bitmap)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi
fixtures=${VDISK_FIXTURES:-$here/../../shared/fixtures}
sanitizer=${FUZZ_SANITIZER:-address}

# cargo-fuzz passes nightly-only flags (-Zsanitizer, ...); RUSTC_BOOTSTRAP lets the stable
# toolchain accept them, so no nightly install is needed.
export RUSTC_BOOTSTRAP=1

# Inputs are written to a scratch file on every execution: keep that off the disk.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi

# The largest input each target gets (bigger seeds are cut to it when loaded). qemu-img's
# smallest VHDX is 8 MiB (1 MiB alignment of every region), so that target needs room.
max_len() {
    case $1 in
        qcow2) echo $((1 << 20)) ;;
        vhdx) echo $((9 << 20)) ;;
        vmdk_descriptor) echo 65536 ;;
        vmdk_image) echo $((1 << 20)) ;;
        # aes-256 key material makes the header region of a luks image 2 MiB.
        luks_header) echo $((5 << 19)) ;;
        qcow2_snapshot_bitmap) echo $((1 << 20)) ;;
    esac
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# seed TARGET FILE...: copies existing files into the corpus under a stable name.
seed() {
    local target=$1
    shift
    mkdir -p "corpus/$target"
    local f
    for f in "$@"; do
        # The folder's name too: fixture sets and qemu-img images share file names.
        if [ -f "$f" ]; then
            cp -f "$f" "corpus/$target/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
        fi
    done
}

# unpack FILE: prints the path of FILE decompressed into the work folder.
unpack() {
    local f=$1 out="$work/unpacked/$(basename "$1")"
    mkdir -p "$work/unpacked"
    out=${out%.gz}
    out=${out%.xz}
    case $f in
        *.gz) gzip -dc "$f" >"$out" ;;
        *.xz) xz -dc "$f" >"$out" ;;
        *) cp "$f" "$out" ;;
    esac
    echo "$out"
}

# qio FORMAT IMAGE COMMAND...: qemu-io commands on an image (failures are fine: a seed
# that qemu refused to write is still a seed).
qio() {
    local fmt=$1 img=$2
    shift 2
    local args=()
    local c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f "$fmt" "${args[@]}" "$img" >/dev/null 2>&1 || true
}

have_fixtures=true
if [ ! -d "$fixtures" ]; then
    echo "note: no fixtures at $fixtures; seeding from qemu-img images only" >&2
    have_fixtures=false
fi

seed_qcow2() {
    local d=$work/qcow2 n=0 opts
    mkdir -p "$d"
    # Small clusters keep whole images (L1, L2, refcounts, data) within max_len.
    for opts in \
        cluster_size=512 \
        cluster_size=4096,extended_l2=off \
        cluster_size=4096,compat=0.10 \
        cluster_size=4096,refcount_bits=1 \
        cluster_size=4096,refcount_bits=64 \
        cluster_size=16384,extended_l2=on \
        cluster_size=4096,compression_type=zstd \
        cluster_size=65536; do
        n=$((n + 1))
        qemu-img create -q -f qcow2 -o "$opts" "$d/$n.qcow2" 2M
        cp "$d/$n.qcow2" "$d/$n-empty.qcow2"
        qio qcow2 "$d/$n.qcow2" "write -P 1 0 300k" "write -z 512k 8k" \
            "write -c -P 3 1m 64k" "write -P 2 1536k 4k"
    done
    # Internal snapshots, persistent bitmaps, a backing file and a data file (never followed).
    qemu-img snapshot -c snap "$d/2.qcow2"
    qio qcow2 "$d/2.qcow2" "write -P 4 0 8k"
    qemu-img bitmap --add "$d/3-empty.qcow2" first 2>/dev/null || true
    cp "$d/2.qcow2" "$d/base.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$d/overlay.qcow2"
    qio qcow2 "$d/overlay.qcow2" "write -P 5 4k 4k"
    # qemu-img creates a relative data_file relative to its working folder, not the image's.
    (cd "$d" && qemu-img create -q -f qcow2 -o cluster_size=4096,data_file=data.raw datafile.qcow2 2M)
    # Lazy refcounts left dirty by a crash: opening it read-write rebuilds the refcounts.
    qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$d/dirty.qcow2" 2M
    qio qcow2 "$d/dirty.qcow2" "write -P 6 0 12k" abort
    seed qcow2 "$d"/*.qcow2 "$fixtures/fragments/libqcow/file_header.1"
    if $have_fixtures; then
        seed qcow2 "$fixtures"/qcow2/*.qcow2 "$fixtures"/malformed/*.qcow* \
            "$fixtures"/qcow2/dissect-backing-chain/*.qcow2 \
            "$fixtures"/qcow2/dissect-external-data-file/data-file.qcow2 \
            "$(unpack "$fixtures"/qcow2/freebsd-mkimg-512--img-1x1-512-gpt.qcow2.xz)"
    fi
}

seed_vhdx() {
    local d=$work/vhdx
    mkdir -p "$d"
    qemu-img create -q -f vhdx "$d/dynamic.vhdx" 1M
    qemu-img create -q -f vhdx -o subformat=fixed "$d/fixed.vhdx" 1M
    qemu-img create -q -f vhdx -o block_size=1M,block_state_zero=off "$d/data.vhdx" 4M
    qio vhdx "$d/data.vhdx" "write -P 1 0 64k" "write -P 2 2m 4k"
    # A crash right after a metadata write can leave a log to replay.
    qemu-img create -q -f vhdx "$d/log.vhdx" 4M
    qio vhdx "$d/log.vhdx" "write -P 3 1m 4k" abort
    qemu-img create -q -f vpc "$d/dynamic.vhd" 4M
    qio vpc "$d/dynamic.vhd" "write -P 1 0 64k" "write -P 2 3m 4k"
    qemu-img create -q -f vpc -o subformat=fixed "$d/fixed.vhd" 1M
    qemu-img create -q -f vpc -o force_size=on "$d/forced.vhd" 3M
    seed vhdx "$d"/*.vhdx "$d"/*.vhd
    if $have_fixtures; then
        seed vhdx "$fixtures"/vhd/*.vhd "$fixtures"/malformed/*.vhd \
            "$fixtures"/fragments/libvhdi/* \
            "$(unpack "$fixtures"/vhd/freebsd-mkimg-512--img-1x1-512-gpt.vhd.xz)" \
            "$(unpack "$fixtures"/vhd/win10-dynamic--dynamic.vhd.gz)" \
            "$(unpack "$fixtures"/vhdx/freebsd-mkimg-512--img-1x1-512-gpt.vhdx.xz)" \
            "$(unpack "$fixtures"/vhdx/freebsd-mkimg-4096phys--img-1x1-4096-gpt.vhdx.xz)"
    fi
}

# descriptors FILE...: the embedded descriptor of each sparse VMDK, or the file itself when
# it is already a text descriptor.
descriptors() {
    python3 - "$work/vmdk-desc" "$@" <<'EOF'
import os, struct, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for path in sys.argv[2:]:
    data = open(path, "rb").read(1 << 20)
    text = None
    if data[:4] == b"KDMV" and len(data) >= 44:
        offset, size = struct.unpack_from("<QQ", data, 28)
        if offset and size:
            text = data[offset * 512:(offset + size) * 512].split(b"\0")[0]
    elif b"createType" in data[:4096]:
        text = data[:65536]
    if text:
        with open(os.path.join(out, os.path.basename(path) + ".txt"), "wb") as f:
            f.write(text)
EOF
}

seed_vmdk() {
    local d=$work/vmdk sub
    mkdir -p "$d"
    for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat \
        streamOptimized; do
        qemu-img create -q -f vmdk -o subformat=$sub "$d/$sub.vmdk" 1M
        qio vmdk "$d/$sub.vmdk" "write -P 1 0 64k" "write -P 2 512k 4k"
    done
    qemu-img create -q -f vmdk -o zeroed_grain=on,adapter_type=lsilogic "$d/zeroed.vmdk" 1M
    qio vmdk "$d/zeroed.vmdk" "write -P 1 0 64k" "write -z 64k 64k"
    qemu-img create -q -f vmdk -o compat6=on,hwversion=undefined "$d/compat6.vmdk" 1M
    qemu-img create -q -f vmdk -b monolithicSparse.vmdk -F vmdk "$d/delta.vmdk"
    local images=("$d"/*.vmdk)
    if $have_fixtures; then
        images+=("$fixtures"/vmdk/*.vmdk "$fixtures"/vmdk/*/*.vmdk "$fixtures"/malformed/*.vmdk
            "$(unpack "$fixtures"/vmdk/esxi-sesparse-extent--sesparse.vmdk.gz)")
        seed vmdk_descriptor "$fixtures"/fragments/libvmdk/*
    fi
    seed vmdk_image "${images[@]}"
    descriptors "${images[@]}"
    seed vmdk_descriptor "$work"/vmdk-desc/*
}

# luks: qemu-img images with the passphrase the target tries ("fuzz") and iter-time=0, so
# their PBKDF2 counts are qemu's floor of 1000, which the fuzzing build does not cap: they
# unlock. Each cipher, mode and hash family vdisk implements once; one with two key slots.
seed_luks() {
    local d=$work/luks n=0 opts
    mkdir -p "$d"
    for opts in \
        "" \
        cipher-alg=aes-128,ivgen-alg=plain \
        cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1 \
        cipher-alg=aes-192,hash-alg=sha512 \
        cipher-alg=aes-128,cipher-mode=ecb,hash-alg=sha224; do
        n=$((n + 1))
        qemu-img create -q -f luks --object secret,id=k,data=fuzz \
            -o "key-secret=k,iter-time=0${opts:+,$opts}" "$d/$n.luks" 64k
    done
    qemu-img amend --object secret,id=k,data=fuzz --object secret,id=k2,data=other \
        --image-opts "driver=luks,file.filename=$d/3.luks,key-secret=k" \
        -o state=active,new-secret=k2,keyslot=5,iter-time=0
    seed luks_header "$d"/*.luks
}

# qcow2 with internal snapshots and persistent bitmaps, small clusters so the tables are a
# large share of each input.
seed_qcow2_snapshot_bitmap() {
    local d=$work/qcow2-snap cs
    mkdir -p "$d"
    for cs in 512 4096; do
        qemu-img create -q -f qcow2 -o cluster_size=$cs "$d/sb-$cs.qcow2" 1M
        qio qcow2 "$d/sb-$cs.qcow2" "write -P 1 0 64k"
        qemu-img snapshot -c first "$d/sb-$cs.qcow2"
        qemu-img bitmap --add -g 4096 "$d/sb-$cs.qcow2" dirty
        qemu-img bitmap --add --disable "$d/sb-$cs.qcow2" off
        qio qcow2 "$d/sb-$cs.qcow2" "write -P 2 32k 8k" "write -P 3 512k 4k"
        qemu-img snapshot -c second "$d/sb-$cs.qcow2"
        qio qcow2 "$d/sb-$cs.qcow2" "write -z 0 4k"
    done
    # A v2 image has snapshots but no bitmaps; one image has bitmaps only.
    qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 "$d/v2.qcow2" 1M
    qio qcow2 "$d/v2.qcow2" "write -P 4 0 16k"
    qemu-img snapshot -c old "$d/v2.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=1024 "$d/bitmaps.qcow2" 1M
    qemu-img bitmap --add -g 512 "$d/bitmaps.qcow2" a
    qio qcow2 "$d/bitmaps.qcow2" "write -P 5 0 12k"
    qemu-img bitmap --add "$d/bitmaps.qcow2" b
    seed qcow2_snapshot_bitmap "$d"/*.qcow2
}

need_vhdx=false
need_vmdk=false
for t in "${targets[@]}"; do
    case $t in
        qcow2) seed_qcow2 ;;
        vhdx) need_vhdx=true ;;
        vmdk_descriptor | vmdk_image) need_vmdk=true ;;
        luks_header) seed_luks ;;
        qcow2_snapshot_bitmap) seed_qcow2_snapshot_bitmap ;;
        *)
            echo "unknown target $t (targets: ${all[*]})" >&2
            exit 2
            ;;
    esac
done
$need_vhdx && seed_vhdx
$need_vmdk && seed_vmdk

mkdir -p logs
status=0
for t in "${targets[@]}"; do
    echo "== $t: $secs s, corpus $(ls "corpus/$t" | wc -l) inputs" >&2
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a parser must not balloon.
    cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" \
        -print_final_stats=1 2>&1 | tee "logs/$t.log" || status=1
done
exit $status
