#!/bin/bash
# Upgrading and resizing disks the way maintenance scripts do: an old compat=0.10 image is
# amended to v3 with lazy refcounts, grown, checked; raw disks are grown and shrunk.
source "$(dirname "$0")/common.bash"

run qemu-img create -f qcow2 -o compat=0.10 old.qcow2 8M
io qcow2 old.qcow2 "write -P 0x44 0 64k" "write -P 0x45 7M 64k"
run qemu-img info old.qcow2
run qemu-img amend -o compat=1.1 old.qcow2
run_info qemu-img info old.qcow2
run qemu-img amend -o lazy_refcounts=on old.qcow2
run qemu-img amend -o refcount_bits=32 old.qcow2
run_info qemu-img info --output=json old.qcow2
run qemu-img check old.qcow2
run qemu-img resize old.qcow2 +8M
run qemu-img resize old.qcow2 12M
run qemu-img resize --shrink old.qcow2 12M
run_info qemu-img info old.qcow2
run qemu-img amend -o cluster_size=4k old.qcow2
run qemu-img amend -o nosuch=1 old.qcow2
run qemu-img check old.qcow2
io qcow2 old.qcow2 "read -P 0x44 0 64k" "read -P 0x45 7M 64k"
run qemu-img create -f raw disk.raw 4M
io raw disk.raw "write -P 0x55 0 1M"
run qemu-img resize -f raw disk.raw 16M
run qemu-img resize -f raw disk.raw -- -8M
run qemu-img resize -f raw --shrink disk.raw 2M
run qemu-img info -f raw disk.raw
run qemu-img resize disk.raw 3x
run qemu-img create -f vpc old.vhd 8M
run qemu-img resize old.vhd 16M
run qemu-img info old.vhd
