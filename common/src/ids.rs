//! Stable node ids. An object is `(volume, inode)`; both are packed into one `u64` so that the
//! same object always has the same FUSE inode number on every client, with no mapping table.
//!
//! Layout: the high 24 bits hold the volume id, the low 40 bits the per-volume inode. Volume ids
//! start at 1, so no object id collides with the FUSE root (1) of the `/coda` mount.

/// Volume id: assigned by the state machine when a volume is created, never reused.
pub type VolumeId = u32;

/// Bits of a node id that hold the per-volume inode.
pub const INODE_BITS: u32 = 40;
/// Largest per-volume inode number.
pub const MAX_LOCAL_INODE: u64 = (1 << INODE_BITS) - 1;
/// Largest volume id that fits in a node id.
pub const MAX_VOLUME_ID: VolumeId = (1 << (64 - INODE_BITS)) - 1;
/// Per-volume inode of every volume's root directory.
pub const VOLUME_ROOT_INODE: u64 = 1;

/// Packs a volume id and per-volume inode into a node id.
pub fn make_ino(volume: VolumeId, local: u64) -> u64 {
    (u64::from(volume) << INODE_BITS) | (local & MAX_LOCAL_INODE)
}

/// Splits a node id into volume id and per-volume inode.
pub fn split_ino(ino: u64) -> (VolumeId, u64) {
    // The shift leaves at most 24 significant bits, so the conversion cannot fail.
    let volume = VolumeId::try_from(ino >> INODE_BITS).unwrap_or(VolumeId::MAX);
    (volume, ino & MAX_LOCAL_INODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (v, i) in [(1, 1), (7, 12345), (MAX_VOLUME_ID, MAX_LOCAL_INODE)] {
            assert_eq!(split_ino(make_ino(v, i)), (v, i));
        }
        assert_ne!(
            make_ino(1, VOLUME_ROOT_INODE),
            1,
            "volume roots must not collide with the mount root"
        );
    }
}
