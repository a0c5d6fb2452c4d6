//! The blob cache's memory: which blobs are cached, their sizes, their order of use and
//! whether each still has to be re-hashed, in about 55 bytes per entry.
//!
//! Why not `lru::LruCache<Hash, u64>` beside a `HashSet` of unverified hashes, as before: that
//! costs about 100 bytes per entry (a heap node each, and a map pointing at it), 100 MB for a
//! web node with a million files cached, a third of a mount daemon's budget
//! (docs/SCALING.md). Here an entry is a 48-byte slot in fixed-size segments, the order of use
//! is a doubly linked list of slot numbers, the unverified flag is the top bit of the size, and
//! a [`HashTable`] of 4-byte slot numbers finds an entry by its hash.
//!
//! The table is hashed with the first 8 bytes of the content hash. Those are already uniformly
//! distributed: blake3 is a cryptographic hash, so content chosen to make many entries share
//! a bucket would need a multi-collision on 64 bits, which costs far more than it could slow.
//!
//! Slots of removed entries are reused; the segments stay allocated at the largest number of
//! entries ever held (the cache's byte budget bounds that).
use codafs_common::Hash;
use hashbrown::HashTable;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;
/// Slots per segment (a segment is 192 KiB): growth never copies the slots, and at most one
/// segment is partly unused.
const SEG_BITS: u32 = 12;
const SEG: usize = 1 << SEG_BITS;
/// The top bit of [`Slot::len`]: the entry is unverified. Sizes stay far below 2^63 bytes.
const UNVERIFIED: u64 = 1 << 63;

#[derive(Clone, Copy)]
struct Slot {
    hash: Hash,
    /// Size in bytes, with [`UNVERIFIED`] set while the entry is unverified.
    len: u64,
    /// Next newer entry (or, for a free slot, nothing).
    newer: u32,
    /// Next older entry (or, for a free slot, the next free slot).
    older: u32,
}

const EMPTY: Slot = Slot {
    hash: Hash([0; 32]),
    len: 0,
    newer: NIL,
    older: NIL,
};

/// Cached entries in order of use, least recently used first to go.
pub struct Index {
    table: HashTable<u32>,
    segs: Vec<Box<[Slot]>>,
    /// Slots handed out so far; those below it are in use or on the free list.
    used: u32,
    /// First free slot, the rest linked through `older`.
    free: u32,
    newest: u32,
    oldest: u32,
    len: usize,
    bytes: u64,
    unverified: usize,
}

/// Where an entry's hash falls in the table (see the module's note on why this suffices).
fn key(h: &Hash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.0[..8]);
    u64::from_le_bytes(b)
}

fn at(segs: &[Box<[Slot]>], i: u32) -> &Slot {
    &segs[(i >> SEG_BITS) as usize][i as usize & (SEG - 1)]
}

impl Default for Index {
    fn default() -> Self {
        Index {
            table: HashTable::new(),
            segs: Vec::new(),
            used: 0,
            free: NIL,
            newest: NIL,
            oldest: NIL,
            len: 0,
            bytes: 0,
            unverified: 0,
        }
    }
}

impl Index {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of all entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries still unverified.
    pub fn unverified(&self) -> usize {
        self.unverified
    }

    fn slot(&self, i: u32) -> &Slot {
        at(&self.segs, i)
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.segs[(i >> SEG_BITS) as usize][i as usize & (SEG - 1)]
    }

    fn find(&self, h: &Hash) -> Option<u32> {
        self.table.find(key(h), |&i| at(&self.segs, i).hash == *h).copied()
    }

    /// Whether `h` is held (its place in the order is left alone).
    pub fn contains(&self, h: &Hash) -> bool {
        self.find(h).is_some()
    }

    /// Takes slot `i` out of the order of use.
    fn unlink(&mut self, i: u32) {
        let Slot { newer, older, .. } = *self.slot(i);
        match newer {
            NIL => self.newest = older,
            n => self.slot_mut(n).older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slot_mut(o).newer = newer,
        }
    }

    /// Puts slot `i` first in the order of use.
    fn link_newest(&mut self, i: u32) {
        let was = self.newest;
        {
            let s = self.slot_mut(i);
            s.newer = NIL;
            s.older = was;
        }
        match was {
            NIL => self.oldest = i,
            w => self.slot_mut(w).newer = i,
        }
        self.newest = i;
    }

    /// Marks `h` used; its size and whether it is unverified, if held.
    pub fn touch(&mut self, h: &Hash) -> Option<(u64, bool)> {
        let i = self.find(h)?;
        self.unlink(i);
        self.link_newest(i);
        let len = self.slot(i).len;
        Some((len & !UNVERIFIED, len & UNVERIFIED != 0))
    }

    /// Adds `h` (or sets its size) as the most recently used entry; `unverified` marks it so
    /// (an entry already unverified stays so). Its previous size, if it was held; `Err` when
    /// no slot is left (over 4 billion entries), and nothing changed.
    pub fn insert(&mut self, h: Hash, len: u64, unverified: bool) -> Result<Option<u64>, Full> {
        let len = len & !UNVERIFIED;
        let flag = if unverified { UNVERIFIED } else { 0 };
        if let Some(i) = self.find(&h) {
            let old = self.slot(i).len;
            if unverified && old & UNVERIFIED == 0 {
                self.unverified += 1;
            }
            self.slot_mut(i).len = len | flag | (old & UNVERIFIED);
            self.bytes = self.bytes - (old & !UNVERIFIED) + len;
            self.unlink(i);
            self.link_newest(i);
            return Ok(Some(old & !UNVERIFIED));
        }
        let i = self.take_slot()?;
        *self.slot_mut(i) = Slot {
            hash: h,
            len: len | flag,
            ..EMPTY
        };
        self.link_newest(i);
        let Index { table, segs, .. } = self;
        table.insert_unique(key(&h), i, |&j| key(&at(segs, j).hash));
        self.len += 1;
        self.bytes += len;
        self.unverified += usize::from(unverified);
        Ok(None)
    }

    fn take_slot(&mut self) -> Result<u32, Full> {
        if self.free != NIL {
            let i = self.free;
            self.free = self.slot(i).older;
            return Ok(i);
        }
        if self.used == NIL {
            return Err(Full);
        }
        let i = self.used;
        if i as usize & (SEG - 1) == 0 {
            self.segs.push(vec![EMPTY; SEG].into_boxed_slice());
        }
        self.used += 1;
        Ok(i)
    }

    /// Removes `h`; its size, if it was held.
    pub fn remove(&mut self, h: &Hash) -> Option<u64> {
        let Index { table, segs, .. } = self;
        let i = match table.find_entry(key(h), |&i| at(segs, i).hash == *h) {
            Ok(e) => e.remove().0,
            Err(_) => return None,
        };
        Some(self.release(i))
    }

    /// Unlinks slot `i` (already out of the table), frees it, and returns its size.
    fn release(&mut self, i: u32) -> u64 {
        self.unlink(i);
        let len = self.slot(i).len;
        self.len -= 1;
        self.bytes -= len & !UNVERIFIED;
        if len & UNVERIFIED != 0 {
            self.unverified -= 1;
        }
        let free = self.free;
        *self.slot_mut(i) = Slot { older: free, ..EMPTY };
        self.free = i;
        len & !UNVERIFIED
    }

    /// Marks `h` verified.
    pub fn set_verified(&mut self, h: &Hash) {
        if let Some(i) = self.find(h) {
            let s = self.slot_mut(i);
            if s.len & UNVERIFIED != 0 {
                s.len &= !UNVERIFIED;
                self.unverified -= 1;
            }
        }
    }

    /// Every entry, least recently used first: (hash, size, unverified). For saving the index
    /// at a clean stop, so the next start rebuilds it in the same order of use.
    pub fn entries(&self) -> impl Iterator<Item = (Hash, u64, bool)> + '_ {
        let mut i = self.oldest;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let s = self.slot(i);
            i = s.newer;
            Some((s.hash, s.len & !UNVERIFIED, s.len & UNVERIFIED != 0))
        })
    }

    /// Removes least recently used entries until at most `max_bytes` are held, sparing those
    /// `spare` says to keep (they keep their place); the removed hashes.
    pub fn evict_to(&mut self, max_bytes: u64, spare: impl Fn(&Hash) -> bool) -> Vec<Hash> {
        let mut gone = Vec::new();
        let mut i = self.oldest;
        while self.bytes > max_bytes && i != NIL {
            let Slot { hash, newer, .. } = *self.slot(i);
            if !spare(&hash) {
                if let Ok(e) = self.table.find_entry(key(&hash), |&j| j == i) {
                    e.remove();
                }
                self.release(i);
                gone.push(hash);
            }
            i = newer;
        }
        gone
    }
}

#[cfg(test)]
impl Index {
    /// Hashes, least recently used first; checks that the links agree in both directions.
    fn order(&self) -> Vec<Hash> {
        let out: Vec<Hash> = self.entries().map(|(h, _, _)| h).collect();
        let mut back = Vec::new();
        let mut i = self.newest;
        while i != NIL {
            back.push(self.slot(i).hash);
            i = self.slot(i).older;
        }
        back.reverse();
        assert_eq!(out, back, "newer and older links disagree");
        out
    }
}

/// The index holds as many entries as slot numbers can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(n: u8) -> Hash {
        Hash::of(&[n])
    }

    #[test]
    fn least_recently_used_goes_first_and_spared_entries_keep_their_place() {
        let mut x = Index::default();
        for n in 0..4 {
            assert_eq!(x.insert(h(n), 10, false), Ok(None));
        }
        assert_eq!(x.touch(&h(0)), Some((10, false)));
        // Order, oldest first: 1 2 3 0.
        assert_eq!(x.evict_to(25, |k| *k == h(1)), vec![h(2), h(3)]);
        assert_eq!((x.len(), x.bytes()), (2, 20));
        assert!(x.contains(&h(1)) && x.contains(&h(0)));
        assert_eq!(x.evict_to(10, |_| false), vec![h(1)]);
    }

    #[test]
    fn sizes_and_the_unverified_count_follow_every_change() {
        let mut x = Index::default();
        x.insert(h(1), 5, true).unwrap();
        x.insert(h(2), 7, false).unwrap();
        assert_eq!((x.bytes(), x.unverified()), (12, 1));
        assert_eq!(x.insert(h(2), 9, true), Ok(Some(7)));
        assert_eq!(x.insert(h(2), 9, false), Ok(Some(9)), "stays unverified");
        assert_eq!((x.bytes(), x.unverified()), (14, 2));
        x.set_verified(&h(1));
        x.set_verified(&h(1));
        assert_eq!(x.unverified(), 1);
        assert_eq!(x.remove(&h(2)), Some(9));
        assert_eq!(x.remove(&h(2)), None);
        assert_eq!((x.len(), x.bytes(), x.unverified()), (1, 5, 0));
        // The freed slot is reused, not a new one taken.
        x.insert(h(3), 1, false).unwrap();
        assert_eq!(x.used, 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16, bool),
        Touch(u8),
        Remove(u8),
        Verify(u8),
        Evict(u16, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..40, 0u16..1000, any::<bool>()).prop_map(|(k, l, u)| Op::Insert(k, l, u)),
            (0u8..40).prop_map(Op::Touch),
            (0u8..40).prop_map(Op::Remove),
            (0u8..40).prop_map(Op::Verify),
            (0u16..20_000, 0u8..40).prop_map(|(m, s)| Op::Evict(m, s)),
        ]
    }

    proptest! {
        /// The index behaves as a plain list of (hash, size, unverified), newest last.
        #[test]
        fn matches_a_plain_list(ops in proptest::collection::vec(op(), 1..400)) {
            let mut x = Index::default();
            let mut model: Vec<(Hash, u64, bool)> = Vec::new();
            for o in ops {
                match o {
                    Op::Insert(k, l, u) => {
                        let pos = model.iter().position(|e| e.0 == h(k));
                        let old = pos.map(|p| model.remove(p));
                        prop_assert_eq!(x.insert(h(k), l.into(), u), Ok(old.map(|e| e.1)));
                        model.push((h(k), l.into(), u || old.is_some_and(|e| e.2)));
                    }
                    Op::Touch(k) => {
                        let pos = model.iter().position(|e| e.0 == h(k));
                        let e = pos.map(|p| model.remove(p));
                        prop_assert_eq!(x.touch(&h(k)), e.map(|e| (e.1, e.2)));
                        model.extend(e);
                    }
                    Op::Remove(k) => {
                        let pos = model.iter().position(|e| e.0 == h(k));
                        let e = pos.map(|p| model.remove(p));
                        prop_assert_eq!(x.remove(&h(k)), e.map(|e| e.1));
                    }
                    Op::Verify(k) => {
                        x.set_verified(&h(k));
                        if let Some(e) = model.iter_mut().find(|e| e.0 == h(k)) {
                            e.2 = false;
                        }
                    }
                    Op::Evict(max, s) => {
                        let spare = h(s);
                        let mut total: u64 = model.iter().map(|e| e.1).sum();
                        let mut gone = Vec::new();
                        model.retain(|e| {
                            if total <= max.into() || e.0 == spare {
                                return true;
                            }
                            total -= e.1;
                            gone.push(e.0);
                            false
                        });
                        prop_assert_eq!(x.evict_to(max.into(), |k| *k == spare), gone);
                    }
                }
                prop_assert_eq!(x.len(), model.len());
                prop_assert_eq!(x.bytes(), model.iter().map(|e| e.1).sum::<u64>());
                prop_assert_eq!(x.unverified(), model.iter().filter(|e| e.2).count());
                for e in &model {
                    prop_assert!(x.contains(&e.0));
                }
            }
            // The order of use, oldest first, is the model's (walked both ways).
            let want: Vec<Hash> = model.iter().map(|e| e.0).collect();
            prop_assert_eq!(x.order(), want);
        }
    }
}
