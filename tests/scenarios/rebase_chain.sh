#!/bin/bash
# Backing chains as CI and backup scripts handle them: overlays on a base, a safe rebase
# that drops the middle layer, an unsafe rebase after a rename, and flattening by convert.
source "$(dirname "$0")/common.bash"

run qemu-img create -f qcow2 base.qcow2 16M
io qcow2 base.qcow2 "write -P 0x61 0 4M"
run qemu-img create -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
io qcow2 mid.qcow2 "write -P 0x62 1M 1M"
run qemu-img create -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
io qcow2 top.qcow2 "write -P 0x63 3M 64k"
run_info qemu-img info --backing-chain top.qcow2
run qemu-img map --output=json top.qcow2
run qemu-img map top.qcow2
run qemu-img convert -O raw top.qcow2 flat.raw
run qemu-img rebase -b base.qcow2 -F qcow2 top.qcow2
run_info qemu-img info --backing-chain --output=json top.qcow2
run qemu-img compare top.qcow2 flat.raw
run qemu-img check top.qcow2
mv base.qcow2 renamed.qcow2
run qemu-img info top.qcow2
run qemu-img rebase -u -b renamed.qcow2 -F qcow2 top.qcow2
run_info qemu-img info top.qcow2
run qemu-img compare top.qcow2 flat.raw
run qemu-img rebase -b '' top.qcow2
run_info qemu-img info top.qcow2
run qemu-img compare -s top.qcow2 flat.raw
run qemu-img compare top.qcow2 flat.raw
run qemu-img rebase -b gone.qcow2 -F qcow2 top.qcow2
