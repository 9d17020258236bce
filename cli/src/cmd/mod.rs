//! One module per sub-command.

pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod measure;
