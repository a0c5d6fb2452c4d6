//! Reads that do not go through the disk cache: when the cache disk is full, a fetched blob is
//! streamed through memory instead. The whole blob is still received and hashed (a reader never
//! gets bytes of a copy that fails verification), but only a window of it around the requested
//! offset is kept, in a few bounded in-memory windows, so the reads that follow (the kernel
//! reads a file in pieces) are served from memory instead of fetching the blob again.
use std::collections::VecDeque;
use std::sync::Mutex;

use codafs_common::Hash;

use crate::core::remote::ChunkSink;

/// Bytes kept per window.
pub const WINDOW: u64 = 16 << 20;
/// Windows kept (the memory a full cache disk costs: `WINDOWS * WINDOW`).
pub const WINDOWS: usize = 4;
/// Windows start at a multiple of this, so neighbouring reads share one.
const ALIGN: u64 = 1 << 20;

/// One verified range of a blob.
struct Window {
    hash: Hash,
    start: u64,
    data: bytes::Bytes,
}

/// The in-memory windows, most recently used last.
#[derive(Default)]
pub struct Windows {
    list: Mutex<VecDeque<Window>>,
}

impl Windows {
    /// `len` bytes (or fewer at the end of the blob) at `offset` of `hash`, if a window holds
    /// all of them.
    pub fn get(&self, hash: &Hash, offset: u64, len: u64, blob_len: u64) -> Option<Vec<u8>> {
        let end = offset.saturating_add(len).min(blob_len);
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let i = list
            .iter()
            .position(|w| w.hash == *hash && w.start <= offset && w.start + w.data.len() as u64 >= end)?;
        let w = list.remove(i)?;
        let out = w.data[(offset - w.start) as usize..(end - w.start) as usize].to_vec();
        list.push_back(w);
        Some(out)
    }

    /// Keeps verified bytes `data` of content `hash` starting at `start` (a chunk of a large
    /// file, read without the disk cache).
    pub fn insert_range(&self, hash: Hash, start: u64, data: bytes::Bytes) {
        self.insert(Window { hash, start, data });
    }

    fn insert(&self, w: Window) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|o| !(o.hash == w.hash && o.start == w.start));
        list.push_back(w);
        while list.len() > WINDOWS {
            list.pop_front();
        }
    }
}

/// Receives a whole blob, hashing all of it and keeping the window that holds `offset`.
pub struct WindowSink {
    hash: Hash,
    size: u64,
    start: u64,
    keep: Vec<u8>,
    hasher: blake3::Hasher,
    received: u64,
}

impl WindowSink {
    /// A sink for blob `hash` of `size` bytes that keeps the window holding `offset`.
    pub fn new(hash: Hash, size: u64, offset: u64) -> Self {
        let start = (offset / ALIGN) * ALIGN;
        let cap = WINDOW.min(size.saturating_sub(start));
        WindowSink {
            hash,
            size,
            start,
            keep: Vec::with_capacity(cap as usize),
            hasher: blake3::Hasher::new(),
            received: 0,
        }
    }

    /// Stores the window once the whole blob verified; false if it did not.
    /// The whole blob, if it was received and verified and fit in one window (a chunk of a
    /// large file always does).
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        (self.verified() && self.start == 0 && self.keep.len() as u64 == self.size).then_some(self.keep)
    }

    pub fn finish(self, windows: &Windows) -> bool {
        if !self.verified() {
            return false;
        }
        windows.insert(Window {
            hash: self.hash,
            start: self.start,
            data: self.keep.into(),
        });
        true
    }
}

impl ChunkSink for WindowSink {
    fn received(&self) -> u64 {
        self.received
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let end = self.received + data.len() as u64;
        if end > self.size {
            return Err(std::io::Error::other(format!(
                "blob {} is longer than its {} bytes",
                self.hash, self.size
            )));
        }
        self.hasher.update(data);
        // The part of `data` inside [start, start + WINDOW).
        let lo = self.start.max(self.received);
        let hi = (self.start + WINDOW).min(end);
        if lo < hi {
            let from = (lo - self.received) as usize;
            let to = (hi - self.received) as usize;
            self.keep.extend_from_slice(&data[from..to]);
        }
        self.received = end;
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.keep.clear();
        self.hasher = blake3::Hasher::new();
        self.received = 0;
        Ok(())
    }

    fn verified(&self) -> bool {
        self.received == self.size && Hash::from(self.hasher.finalize()) == self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_window_of_a_verified_blob_only() {
        let data: Vec<u8> = (0..(WINDOW + 3 * ALIGN + 17)).map(|i| (i % 253) as u8).collect();
        let hash = Hash::of(&data);
        let len = data.len() as u64;
        let w = Windows::default();
        let offset = 2 * ALIGN + 5;
        let mut sink = WindowSink::new(hash, len, offset);
        for chunk in data.chunks(100_000) {
            sink.write(chunk).unwrap();
        }
        assert!(sink.finish(&w));
        assert_eq!(
            w.get(&hash, offset, 4096, len).unwrap(),
            &data[offset as usize..offset as usize + 4096]
        );
        // Past the window: not held. Before its start: not held.
        assert!(w.get(&hash, 2 * ALIGN + WINDOW, 10, len).is_none());
        assert!(w.get(&hash, 0, 10, len).is_none());

        // Wrong content is never kept.
        let mut bad = WindowSink::new(Hash::of(b"other"), len, 0);
        bad.write(&data).unwrap();
        assert!(!bad.finish(&w));
        assert!(w.get(&Hash::of(b"other"), 0, 1, len).is_none());
    }

    #[test]
    fn the_end_of_a_blob_is_served_short() {
        let data = b"hello, world".to_vec();
        let hash = Hash::of(&data);
        let w = Windows::default();
        let mut sink = WindowSink::new(hash, data.len() as u64, 3);
        sink.write(&data).unwrap();
        assert!(sink.finish(&w));
        assert_eq!(w.get(&hash, 7, 4096, data.len() as u64).unwrap(), b"world");
    }
}
