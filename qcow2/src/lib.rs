//! The qcow2 format driver of vdisk.
//!
//! Not implemented yet (issue 3): this crate exports nothing, so no caller can mistake it for
//! a working driver. Images of this format are refused by `vdisk` with an "unsupported
//! format" error until the driver lands.
#![forbid(unsafe_code)]
