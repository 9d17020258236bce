#!/bin/bash
# A virt-v2v-like import: guest disks arriving as VMDK (sparse, streamOptimized from an
# OVA, flat), VHDX and VHD are inspected, converted to qcow2, checked and compared.
source "$(dirname "$0")/common.bash"

run qemu-img create -f qcow2 guest.qcow2 32M
io qcow2 guest.qcow2 "write -P 0x10 0 512k" "write -P 0x20 7M 64k" "write -z 9M 2M" "write -P 0x30 31M 12k"
run qemu-img convert -O vmdk guest.qcow2 sparse.vmdk
run qemu-img convert -O vmdk -o subformat=streamOptimized guest.qcow2 ova-disk1.vmdk
run qemu-img convert -O vmdk -o subformat=monolithicFlat guest.qcow2 flat.vmdk
run qemu-img convert -O vhdx guest.qcow2 hyperv.vhdx
run qemu-img convert -O vpc -o subformat=fixed,force_size=on guest.qcow2 azure.vhd
for f in sparse.vmdk ova-disk1.vmdk flat.vmdk hyperv.vhdx; do
    run_layout qemu-img info "$f"
    run qemu-img compare guest.qcow2 "$f"
done
run_info qemu-img info -f vpc --output=json azure.vhd
run qemu-img compare -F vpc guest.qcow2 azure.vhd
for f in sparse.vmdk ova-disk1.vmdk flat.vmdk azure.vhd; do
    fmt=vmdk
    [ "$f" = azure.vhd ] && fmt=vpc
    run qemu-img measure -f $fmt -O qcow2 "$f"
    run qemu-img map -f $fmt --output=json "$f"
    run qemu-img convert -f $fmt -O qcow2 -o compat=1.1 "$f" "$f.qcow2"
    run qemu-img check "$f.qcow2"
    run qemu-img compare -s guest.qcow2 "$f.qcow2"
    run_info qemu-img info "$f.qcow2"
done
run qemu-img check ova-disk1.vmdk
run qemu-img convert -f vhdx -O raw hyperv.vhdx hyperv.raw
run qemu-img compare -f raw -F qcow2 hyperv.raw guest.qcow2
