//! A handle to an image that can be swapped atomically while I/O keeps flowing.
//!
//! A device (a VMM disk, a job's target) holds its image through a [`SwappableDev`]. Pivoting
//! at the end of a mirror or an active commit, or inserting a filter node, replaces the image
//! in one atomic step: requests already started finish on the old image, new ones go to the
//! new one.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::dev::BlockDev;

/// An atomically replaceable `Arc<dyn BlockDev>`.
pub struct SwappableDev {
    current: ArcSwap<Arc<dyn BlockDev>>,
}

impl std::fmt::Debug for SwappableDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwappableDev").finish_non_exhaustive()
    }
}

impl SwappableDev {
    /// A handle that starts on `dev`.
    pub fn new(dev: Arc<dyn BlockDev>) -> Self {
        SwappableDev {
            current: ArcSwap::from_pointee(dev),
        }
    }

    /// The device a new request should use.
    pub fn get(&self) -> Arc<dyn BlockDev> {
        Arc::clone(&self.current.load())
    }

    /// Replaces the device; returns the previous one.
    pub fn swap(&self, dev: Arc<dyn BlockDev>) -> Arc<dyn BlockDev> {
        Arc::clone(&self.current.swap(Arc::new(dev)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemImage;

    #[test]
    fn swap_redirects_new_requests() {
        let a: Arc<dyn BlockDev> = Arc::new(MemImage::from_bytes(&[1u8; 4096]));
        let b: Arc<dyn BlockDev> = Arc::new(MemImage::from_bytes(&[2u8; 4096]));
        let handle = SwappableDev::new(a);
        let before = handle.get();
        handle.swap(b);
        let mut buf = [0u8; 1];
        before.read_at(&mut buf, 0).expect("read old");
        assert_eq!(buf[0], 1, "a request in progress keeps its device");
        handle.get().read_at(&mut buf, 0).expect("read new");
        assert_eq!(buf[0], 2);
    }
}
