//! The blob cache with packs (`pack.rs`): served file by file, evicted whole, and kept
//! across restarts, crashes and reboots like any entry.
use super::*;

fn put(c: &BlobCache, data: &[u8]) -> Hash {
    let h = Hash::of(data);
    let mut w = c.writer(h, data.len() as u64).unwrap();
    w.write(data).unwrap();
    w.finish().unwrap();
    h
}

/// `n` small files, each of its own bytes (`seed` tells sets apart).
fn files(n: u8, seed: u8) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![i ^ seed; 100 + i as usize]).collect()
}

/// Caches `data` as one pack; the files' hashes and the pack's name.
fn pack_of(c: &BlobCache, data: &[Vec<u8>]) -> (Vec<Hash>, Hash) {
    let files: Vec<(Hash, &[u8])> = data.iter().map(|d| (Hash::of(d), d.as_slice())).collect();
    assert_eq!(c.put_pack(&files).unwrap(), files.len());
    let (bytes, _) = pack::encode(&files).unwrap();
    (files.iter().map(|f| f.0).collect(), pack::id_of(&bytes))
}

fn pack_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .filter(|f| f.as_ref().unwrap().file_name().to_string_lossy().ends_with(PACK_SUFFIX))
        .count()
}

#[test]
fn a_pack_serves_each_file_and_is_evicted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let c = BlobCache::open_in_boot(dir.path(), 12_000, "boot-a").unwrap();
    let data = files(5, 0);
    let (hs, _) = pack_of(&c, &data);
    assert_eq!(pack_files(dir.path()), 1, "five files, one cache file");
    for (h, d) in hs.iter().zip(&data) {
        assert!(c.holds(h) && c.lookup(h));
        assert_eq!(
            &c.read_at(h, 0, 1 << 20).unwrap(),
            d,
            "never past its end into the next"
        );
        assert_eq!(c.read_at(h, 10, 20).unwrap(), d[10..30]);
    }
    let dest = dir.path().join("copy");
    c.copy_to(&hs[2], data[2].len() as u64, &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data[2]);
    assert_eq!(c.usage().0, 5, "each packed file counts");
    assert_eq!(c.put_pack(&[(hs[0], data[0].as_slice())]).unwrap(), 0, "cached already");
    // In a cache too small for it, a batch is cached a file each.
    let small = BlobCache::open_in_boot(&dir.path().join("small"), 2_000, "boot-a").unwrap();
    let (few, _) = pack_of(&small, &files(3, 0x80));
    assert!(few.iter().all(|h| small.lookup(h)));
    assert_eq!(pack_files(&dir.path().join("small")), 0);

    // A pinned file keeps its whole pack past the budget.
    let pin = c.pin(hs[1]);
    let big = put(&c, &[9; 11_500]);
    assert!(hs.iter().all(|h| c.holds(h)), "the pack of a pinned file stays");
    drop(pin);
    // Unpinned, the pack (least recently used) goes whole, its file with it.
    put(&c, &[8; 11_500]);
    assert!(hs.iter().all(|h| !c.holds(h) && !c.lookup(h)));
    assert!(!c.holds(&big));
    assert_eq!(pack_files(dir.path()), 0);
    assert_eq!(
        c.read_at(&hs[0], 0, 10).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert_eq!(c.usage(), (1, 11_500));
}

#[test]
fn packs_survive_restarts_and_crashes_and_a_torn_one_is_caught_after_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let c = BlobCache::open_in_boot(root, 1 << 20, "boot-a").unwrap();
    let first = files(4, 0);
    let (hs, id) = pack_of(&c, &first);
    let plain = put(&c, b"a file of its own");
    let readable = |c: &BlobCache, hs: &[Hash], data: &[Vec<u8>]| {
        hs.iter()
            .zip(data)
            .all(|(h, d)| c.lookup(h) && &c.read_at(h, 0, 1 << 20).unwrap() == d)
    };
    assert!(c.save_index().unwrap());
    drop(c);

    // A clean restart reads the saved index, packs included.
    let c = BlobCache::open_in_boot(root, 1 << 20, "boot-a").unwrap();
    assert!(readable(&c, &hs, &first) && c.lookup(&plain));
    assert_eq!(c.usage().0, 5);
    drop(c);
    // No saved index now (a start takes it): the next start lists the files, packs too.
    let c = BlobCache::open_in_boot(root, 1 << 20, "boot-a").unwrap();
    assert!(readable(&c, &hs, &first));
    // A crash after a checkpoint: the sweep adopts the pack made after it.
    assert!(c.checkpoint().unwrap());
    let second = files(3, 0x40);
    let (later, _) = pack_of(&c, &second);
    drop(c);
    let c = BlobCache::open_in_boot(root, 1 << 20, "boot-a").unwrap();
    assert!(later.iter().all(|h| !c.holds(h)), "not adopted before the sweep");
    assert_eq!(c.sweep().adopted, 1, "one pack");
    assert!(readable(&c, &later, &second) && readable(&c, &hs, &first));
    assert!(c.save_index().unwrap());
    drop(c);

    // A reboot, and one byte of the first pack changed: its files are dropped at their
    // first use, whole; the rest is checked and served.
    let path = BlobCache::path_in(root, &id, true);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let c = BlobCache::open_in_boot(root, 1 << 20, "boot-b").unwrap();
    assert_eq!(c.unverified(), 3, "two packs and a file");
    assert!(!c.lookup(&hs[0]));
    assert_eq!(c.stats.corrupt_dropped.load(Ordering::Relaxed), 1);
    assert!(hs.iter().all(|h| !c.holds(h)), "the whole pack went");
    assert!(!path.exists());
    assert!(readable(&c, &later, &second) && c.lookup(&plain));
    assert_eq!(c.unverified(), 0);
}

#[test]
fn an_index_saved_before_packs_is_still_read() {
    let h = Hash::of(b"old");
    let mut out = SAVED_MAGIC_1.to_vec();
    out.extend_from_slice(&6u32.to_le_bytes());
    out.extend_from_slice(b"boot-a");
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&h.0);
    out.extend_from_slice(&(3 | SAVED_UNVERIFIED).to_le_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    let saved = parse_saved_index(&out).unwrap();
    assert_eq!(saved.boot, "boot-a");
    let [f] = saved.entries.as_slice() else {
        panic!("one entry")
    };
    assert_eq!((f.hash, f.len, f.unverified, f.members.is_none()), (h, 3, true, true));
    // The same bytes under the new magic carry no pack section either, and parse alike; a
    // flagged entry without its files does not.
    out[..8].copy_from_slice(SAVED_MAGIC);
    let n = out.len() - 32;
    out.truncate(n);
    out[n - 8..].copy_from_slice(&(3 | SAVED_PACK).to_le_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    assert!(parse_saved_index(&out).is_none());
}

#[test]
fn a_saved_pack_whose_files_do_not_fill_it_is_refused() {
    let files = [
        (Hash::of(b"ab"), b"ab".as_slice()),
        (Hash::of(b"cde"), b"cde".as_slice()),
    ];
    let (bytes, _) = pack::encode(&files).unwrap();
    let saved = |len: u64| {
        let mut out = SAVED_MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(b"b");
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&pack::id_of(&bytes).0);
        out.extend_from_slice(&(len | SAVED_PACK).to_le_bytes());
        out.extend_from_slice(&2u32.to_le_bytes());
        for (h, d) in files {
            out.extend_from_slice(&h.0);
            out.extend_from_slice(&(d.len() as u32).to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        parse_saved_index(&out)
    };
    let ok = saved(bytes.len() as u64).expect("a whole pack");
    assert_eq!(ok.entries[0].members.as_ref().map(Vec::len), Some(2));
    assert!(
        saved(bytes.len() as u64 + 1).is_none(),
        "files one byte short of the pack"
    );
}
