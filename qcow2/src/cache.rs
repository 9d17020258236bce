//! A bounded cache of L2 tables, keyed by host offset.
//!
//! Tables are shared as `Arc<[u64]>` so a reader keeps using a table after it has been
//! evicted; eviction picks the least recently used entry. The capacity is fixed at open, so
//! a huge image costs no more memory than a small one.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// The cache of decoded L2 tables (entries already converted from big-endian).
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    tables: HashMap<u64, (Arc<[u64]>, u64)>,
    clock: u64,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// The table at host `offset`, if cached.
    pub fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.tables.get_mut(&offset).map(|(table, used)| {
            *used = now;
            Arc::clone(table)
        })
    }

    /// Caches `table` as the one at host `offset`, evicting the least recently used table
    /// when full.
    pub fn insert(&self, offset: u64, table: Arc<[u64]>) {
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        if !inner.tables.contains_key(&offset) && inner.tables.len() >= self.capacity {
            let oldest = inner
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                inner.tables.remove(&k);
            }
        }
        inner.tables.insert(offset, (table, now));
    }

    /// Forgets the table at `offset` (it was freed or rewritten elsewhere).
    pub fn remove(&self, offset: u64) {
        self.inner.lock().tables.remove(&offset);
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.inner.lock().tables.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let cache = L2Cache::new(2);
        cache.insert(1, Arc::from(vec![1u64]));
        cache.insert(2, Arc::from(vec![2u64]));
        assert!(cache.get(1).is_some());
        cache.insert(3, Arc::from(vec![3u64]));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(2).is_none());
        assert_eq!(cache.get(1).as_deref(), Some(&[1u64][..]));
        assert_eq!(cache.get(3).as_deref(), Some(&[3u64][..]));
    }
}
