//! Decoded directory listings kept in memory beside the metadata cache, so that a name lookup in
//! a cached directory is a binary search instead of decoding the directory's whole listing from
//! RocksDB (which made every create in a directory of n entries cost O(n): copying 5,000 files
//! into one directory ran at half the speed of 50 directories). Bounded by the number of
//! entries held; the least recently used directories go first.
use std::collections::HashMap;
use std::sync::Arc;

use super::meta::DirEnt;

/// Entries held at most (about 100 bytes each). A bigger listing is not held at all.
const MAX_ENTRIES: usize = 256 * 1024;

/// A directory's listing, sorted by name.
pub type Listing = Arc<Vec<DirEnt>>;

#[derive(Default)]
pub struct Listings {
    map: HashMap<u64, (Listing, u64)>,
    entries: usize,
    tick: u64,
}

impl Listings {
    pub fn get(&mut self, dir: u64) -> Option<Listing> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&dir).map(|(l, used)| {
            *used = tick;
            l.clone()
        })
    }

    pub fn insert(&mut self, dir: u64, listing: Listing) {
        self.remove(dir);
        if listing.len() > MAX_ENTRIES {
            return;
        }
        self.tick += 1;
        self.entries += listing.len();
        self.map.insert(dir, (listing, self.tick));
        while self.entries > MAX_ENTRIES {
            let Some(oldest) = self.map.iter().min_by_key(|(_, (_, used))| *used).map(|(d, _)| *d) else {
                break;
            };
            self.remove(oldest);
        }
    }

    pub fn remove(&mut self, dir: u64) {
        if let Some((l, _)) = self.map.remove(&dir) {
            self.entries -= l.len();
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.entries = 0;
    }
}

/// The entry named `name` in a listing sorted by name.
pub fn find<'a>(listing: &'a [DirEnt], name: &str) -> Option<&'a DirEnt> {
    listing
        .binary_search_by(|e| e.name.as_str().cmp(name))
        .ok()
        .map(|i| &listing[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(n: usize) -> Listing {
        Arc::new(
            (0..n)
                .map(|i| DirEnt {
                    name: format!("f{i:08}"),
                    ino: i as u64,
                    kind: 1,
                })
                .collect(),
        )
    }

    #[test]
    fn bounded_by_entries_least_recently_used_first() {
        let mut l = Listings::default();
        l.insert(1, listing(MAX_ENTRIES / 2));
        l.insert(2, listing(MAX_ENTRIES / 2));
        assert!(l.get(1).is_some(), "1 is now the more recent");
        l.insert(3, listing(10));
        assert!(l.get(2).is_none() && l.get(1).is_some() && l.get(3).is_some());
        assert!(l.entries <= MAX_ENTRIES);
        l.insert(4, listing(MAX_ENTRIES + 1));
        assert!(l.get(4).is_none(), "too big to hold");
        let one = l.get(1).unwrap();
        assert_eq!(find(&one, "f00000007").map(|e| e.ino), Some(7));
        assert!(find(&one, "g").is_none());
        l.clear();
        assert!(l.get(1).is_none() && l.entries == 0);
    }
}
