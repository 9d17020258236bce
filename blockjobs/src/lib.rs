//! Above the format crates: the list of formats, opening images by name, and the engines that
//! copy between images (convert today; mirror, commit, stream and backup later).
#![forbid(unsafe_code)]

pub mod commit;
pub mod compare;
pub mod convert;
pub mod map;
pub mod rate;
pub mod registry;

pub use registry::{format_by_name, formats, open_image, probe};
