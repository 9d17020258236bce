#!/bin/bash
# Block-commit as backup tools use it offline: overlay changes merged down into the base.
source "$(dirname "$0")/common.bash"

run qemu-img create -f qcow2 base.qcow2 16M
io qcow2 base.qcow2 "write -P 0x71 0 2M"
run qemu-img create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
io qcow2 overlay.qcow2 "write -P 0x72 1M 2M"
run qemu-img convert -O raw overlay.qcow2 expect.raw
run qemu-img commit overlay.qcow2
run qemu-img compare base.qcow2 expect.raw
run qemu-img check base.qcow2
run qemu-img map --output=json overlay.qcow2
run qemu-img commit -d overlay.qcow2
run qemu-img commit missing.qcow2
