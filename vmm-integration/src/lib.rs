//! The embedded KVM VMM whose virtio-blk disks use vdisk's block layer.
//!
//! Not implemented yet: this crate exports nothing and builds no binary, so nothing can mistake
//! it for a working VMM.
