#!/bin/bash
# A CI job's snapshot cycle on a qcow2 disk: take, list, revert, delete, and the errors a
# script meets (duplicate or unknown names, a format without snapshots).
source "$(dirname "$0")/common.bash"

run qemu-img create -f qcow2 vm.qcow2 16M
io qcow2 vm.qcow2 "write -P 0x01 0 128k"
run qemu-img snapshot -c clean vm.qcow2
io qcow2 vm.qcow2 "write -P 0x02 64k 128k" "write -P 0x03 15M 4k"
run qemu-img snapshot -c dirty vm.qcow2
run_nodate qemu-img snapshot -l vm.qcow2
run_nodate qemu-img info vm.qcow2
run_nodate qemu-img info --output=json vm.qcow2
run qemu-img check vm.qcow2
run qemu-img snapshot -a clean vm.qcow2
io qcow2 vm.qcow2 "read -P 0x01 0 128k" "read -P 0 15M 4k"
run qemu-img snapshot -d dirty vm.qcow2
run_nodate qemu-img snapshot -l vm.qcow2
run qemu-img snapshot -d nosuch vm.qcow2
run qemu-img snapshot -a nosuch vm.qcow2
run_check qemu-img check --output=json vm.qcow2
run qemu-img convert -l clean -O raw vm.qcow2 clean.raw
run qemu-img compare clean.raw vm.qcow2
run qemu-img create -f raw plain.raw 1M
run qemu-img snapshot -c s plain.raw
run qemu-img snapshot -l plain.raw
run qemu-img snapshot -l missing.qcow2
