#!/bin/bash
# An OpenStack-like image life cycle: an uploaded raw image is inspected (glance), converted
# to qcow2 for the cache, used as the base of instance disks (nova: create -b, resize),
# snapshotted by conversion, and compared back.
source "$(dirname "$0")/common.bash"

run qemu-img create -f raw upload.raw 64M
io raw upload.raw "write -P 0xa1 0 1M" "write -P 0xa2 10M 256k" "write -z 20M 1M" "write -P 0xa3 63M 4k"
run qemu-img info --force-share --output=json upload.raw
run qemu-img info -f raw upload.raw
run qemu-img measure --output=json -O qcow2 upload.raw
run qemu-img convert -f raw -O qcow2 -o compat=1.1 upload.raw _base.qcow2
run_info qemu-img info --output=json _base.qcow2
run qemu-img check _base.qcow2
run qemu-img check --output=json _base.qcow2
run qemu-img compare -f raw -F qcow2 upload.raw _base.qcow2
run qemu-img create -f qcow2 -o backing_file=_base.qcow2,backing_fmt=qcow2 disk.qcow2
run qemu-img resize disk.qcow2 128M
io qcow2 disk.qcow2 "write -P 0xb1 1M 64k" "write -P 0xb2 100M 64k"
run_info qemu-img info disk.qcow2
run_info qemu-img info --backing-chain --output=json disk.qcow2
run qemu-img map --output=json disk.qcow2
run qemu-img map disk.qcow2
run qemu-img check -r leaks disk.qcow2
run qemu-img convert -f qcow2 -O qcow2 -c disk.qcow2 snap.qcow2
run_info qemu-img info --output=json snap.qcow2
run qemu-img compare disk.qcow2 snap.qcow2
run qemu-img compare upload.raw disk.qcow2
run qemu-img compare -s disk.qcow2 snap.qcow2
run qemu-img convert -t none -f qcow2 -O raw disk.qcow2 export.raw
run qemu-img compare -f raw -F qcow2 export.raw disk.qcow2
run qemu-img info -f raw export.raw
run qemu-img measure -O raw disk.qcow2
io qcow2 disk.qcow2 "read -P 0xb1 1M 64k" "read -P 0xa2 10M 256k" "read -P 0xb2 100M 64k"
