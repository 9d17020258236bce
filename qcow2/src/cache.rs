//! A bounded cache of L2 tables, keyed by host offset, with write-back of changed tables.
//!
//! The cache lives inside the image's metadata lock, so it has no lock of its own. Tables
//! changed by a write stay `dirty` until the image writes them back (after making the data
//! and refcounts they depend on durable, see `image.rs`); only clean tables are evicted, so
//! the least recently used clean table goes when the cache is full. The owner writes back
//! when too many tables are dirty, which keeps memory bounded.

use std::collections::HashMap;

/// One cached L2 table (entries already converted from big-endian).
#[derive(Debug)]
pub struct Table {
    /// The entries (two words per entry with extended L2).
    pub words: Vec<u64>,
    /// Changed since it was last written.
    pub dirty: bool,
    used: u64,
}

/// The cache of L2 tables.
#[derive(Debug)]
pub struct L2Cache {
    tables: HashMap<u64, Table>,
    capacity: usize,
    clock: u64,
}

impl L2Cache {
    /// A cache holding at most `capacity` clean tables (at least two).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// The table at host `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&mut Table> {
        self.clock += 1;
        let now = self.clock;
        let table = self.tables.get_mut(&offset)?;
        table.used = now;
        Some(table)
    }

    /// Caches `words` as the table at host `offset`, evicting the least recently used clean
    /// table when full.
    pub fn insert(&mut self, offset: u64, words: Vec<u64>, dirty: bool) -> &mut Table {
        self.clock += 1;
        if !self.tables.contains_key(&offset) && self.tables.len() >= self.capacity {
            let oldest = self
                .tables
                .iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.tables.remove(&k);
            }
        }
        let used = self.clock;
        let slot = self.tables.entry(offset).or_insert(Table {
            words: Vec::new(),
            dirty: false,
            used,
        });
        slot.words = words;
        slot.dirty = dirty;
        slot.used = used;
        slot
    }

    /// Forgets the table at `offset` (its cluster was freed).
    pub fn remove(&mut self, offset: u64) {
        self.tables.remove(&offset);
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Number of tables changed since they were last written.
    pub fn dirty_count(&self) -> usize {
        self.tables.values().filter(|t| t.dirty).count()
    }

    /// True when the owner should write back before caching more tables.
    pub fn needs_writeback(&self) -> bool {
        self.dirty_count() * 2 >= self.capacity
    }

    /// The dirty tables, by offset, to be written back.
    pub fn dirty_tables(&mut self) -> impl Iterator<Item = (u64, &mut Table)> {
        self.tables
            .iter_mut()
            .filter(|(_, t)| t.dirty)
            .map(|(k, t)| (*k, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_clean_table() {
        let mut cache = L2Cache::new(2);
        cache.insert(1, vec![1], false);
        cache.insert(2, vec![2], false);
        assert!(cache.get(1).is_some());
        cache.insert(3, vec![3], false);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(2).is_none());
        assert_eq!(cache.get(1).map(|t| t.words.clone()), Some(vec![1]));
        assert_eq!(cache.get(3).map(|t| t.words.clone()), Some(vec![3]));
    }

    #[test]
    fn dirty_tables_are_not_evicted() {
        let mut cache = L2Cache::new(2);
        cache.insert(1, vec![1], true);
        cache.insert(2, vec![2], true);
        cache.insert(3, vec![3], false);
        assert!(cache.get(1).is_some() && cache.get(2).is_some());
        assert_eq!(cache.dirty_count(), 2);
        assert!(cache.needs_writeback());
    }
}
