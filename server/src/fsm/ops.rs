//! The operations of a commit, one method each: [`Txn::op`] dispatches on the kind. Each
//! checks its preconditions first and refuses (changing nothing: the whole commit is dropped) or
//! writes its records through the transaction.
use codafs_common::make_ino;
use codafs_common::names::validate_name;

use super::*;

impl Txn<'_> {
    /// Applies one operation of a commit; returns the new node id (creations) or 0.
    pub(super) fn op(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        match &op.kind {
            OpKind::Create { .. } => self.op_create(vol, op.expect_version, &op.kind, None, now_ns),
            OpKind::CreateAt { ino, create } => self.op_create(vol, op.expect_version, create, Some(*ino), now_ns),
            OpKind::Reserve { count } => reserve(vol, *count),
            OpKind::SetContent { .. } => self.op_set_content(vol, op, now_ns),
            OpKind::SetAttr { .. } => self.op_set_attr(vol, op, now_ns),
            OpKind::Remove { .. } => self.op_remove(vol, op, now_ns),
            OpKind::Rename { .. } => self.op_rename(vol, op, now_ns),
            OpKind::Link { .. } => self.op_link(vol, op, now_ns),
            OpKind::Expect { parent, name } => self.op_expect(vol, op.expect_version, parent, name),
        }
    }

    /// A precondition: the node at `parent`/`name` is at `expect_version` (0: none there).
    fn op_expect(
        &mut self,
        vol: &mut VolumeRec,
        expect_version: Option<u64>,
        parent: &NodeRef,
        name: &str,
    ) -> TxnResult<u64> {
        validate_name(name).map_err(ApplyError::from)?;
        if expect_version.is_none() {
            return refuse(ApplyError::Invalid("an expect operation needs expect_version".into()));
        }
        let dir = self.resolve_dir(vol, parent)?;
        let existing = match self.dirent(dir.ino, name)? {
            Some(ino) => self.object(ino)?,
            None => None,
        };
        expect(expect_version, existing.as_ref(), name)?;
        Ok(0)
    }

    /// A new file, directory, symlink or special node; with `replace`, it takes the place of a file or symlink
    /// of that name.
    /// (`at`: the reserved node id to use.)
    fn op_create(
        &mut self,
        vol: &mut VolumeRec,
        expect_version: Option<u64>,
        op: &OpKind,
        at: Option<u64>,
        now_ns: i64,
    ) -> TxnResult<u64> {
        let OpKind::Create {
            parent,
            name,
            kind,
            mode,
            hash,
            size,
            symlink,
            replace,
            uid,
            gid,
            mtime_ns,
        } = op
        else {
            return refuse(ApplyError::Invalid("create_at must hold a create operation".into()));
        };
        if at.is_some() && *replace {
            return refuse(ApplyError::Invalid("create_at cannot replace".into()));
        }
        validate_name(name).map_err(ApplyError::from)?;
        let dir = self.resolve_dir(vol, parent)?;
        let existing = match self.dirent(dir.ino, name)? {
            Some(ino) => self.object(ino)?,
            None => None,
        };
        expect(expect_version, existing.as_ref(), name)?;
        check_content(*kind, hash.as_ref(), symlink, name)?;
        if let Some(old) = existing {
            if !*replace {
                return refuse(ApplyError::Exists(name.clone()));
            }
            if old.kind == Kind::Dir || *kind == Kind::Dir {
                return refuse(ApplyError::IsDir(name.clone()));
            }
            self.unlink_object(vol, old, now_ns)?;
        }
        let ino = match at {
            Some(ino) => self.reserved_ino(vol, ino)?,
            None => alloc_ino(vol)?,
        };
        let (size, hash, symlink) = match kind {
            Kind::File => (*size, *hash, String::new()),
            Kind::Dir => (0, None, String::new()),
            Kind::Symlink => (symlink.len() as u64, None, symlink.clone()),
            Kind::Fifo | Kind::Socket | Kind::CharDevice(_) | Kind::BlockDevice(_) => (0, None, String::new()),
        };
        let mtime = if *mtime_ns == 0 { now_ns } else { *mtime_ns };
        // A node a write-back mount made (and named) before sending it was created when that
        // mount says: its ctime stays what the mount showed, not the time the batch arrived.
        let ctime = if at.is_some() { mtime } else { now_ns };
        self.put_object(ObjectRec {
            ino,
            generation: self.index,
            kind: *kind,
            size,
            mode: mode & 0o7777,
            uid: *uid,
            gid: *gid,
            mtime_ns: mtime,
            ctime_ns: ctime,
            nlink: if *kind == Kind::Dir { 2 } else { 1 },
            hash,
            symlink,
            version: self.index,
            parent: dir.ino,
            atime_ns: mtime,
        });
        self.blob_ref(hash, size, 1);
        vol.used_files += 1;
        vol.used_bytes = add_bytes(vol.used_bytes, size)?;
        self.put_dirent(dir.ino, name, Some(ino));
        let mut dir = self.object(dir.ino)?.unwrap_or(dir);
        if *kind == Kind::Dir {
            dir.nlink += 1;
        }
        self.touch_dir(dir, now_ns);
        Ok(ino)
    }

    /// New content for a file (the blob must already have its copies: `Node` checks that).
    fn op_set_content(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        let OpKind::SetContent {
            node,
            hash,
            size,
            mtime_ns,
        } = &op.kind
        else {
            return refuse(ApplyError::Invalid("internal: not a set_content operation".into()));
        };
        let mut o = self.resolve(vol, node)?;
        expect(op.expect_version, Some(&o), &describe(node))?;
        self.op_prior = o.version;
        if o.kind != Kind::File {
            return refuse(ApplyError::IsDir(describe(node)));
        }
        self.blob_ref(o.hash, o.size, -1);
        self.blob_ref(Some(*hash), *size, 1);
        vol.used_bytes = add_bytes(vol.used_bytes.saturating_sub(o.size), *size)?;
        o.hash = Some(*hash);
        o.size = *size;
        o.mtime_ns = if *mtime_ns == 0 { now_ns } else { *mtime_ns };
        o.ctime_ns = now_ns;
        o.version = self.index;
        self.put_object(o);
        Ok(0)
    }

    /// Mode, owner and times.
    fn op_set_attr(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        let OpKind::SetAttr {
            node,
            mode,
            uid,
            gid,
            mtime_ns,
            atime_ns,
        } = &op.kind
        else {
            return refuse(ApplyError::Invalid("internal: not a set_attr operation".into()));
        };
        let mut o = self.resolve(vol, node)?;
        expect(op.expect_version, Some(&o), &describe(node))?;
        self.op_prior = o.version;
        let perms = (o.mode, o.uid, o.gid);
        if let Some(m) = mode {
            o.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            o.uid = *u;
        }
        if let Some(g) = gid {
            o.gid = *g;
        }
        if let Some(t) = mtime_ns {
            o.mtime_ns = *t;
        }
        if let Some(t) = atime_ns {
            o.atime_ns = *t;
        }
        if perms != (o.mode, o.uid, o.gid) {
            self.changed_perms.insert(o.ino);
        }
        o.ctime_ns = now_ns;
        o.version = self.index;
        self.put_object(o);
        Ok(0)
    }

    /// Removes a name; a directory only when empty, unless `recursive`.
    fn op_remove(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        let OpKind::Remove {
            parent,
            name,
            recursive,
        } = &op.kind
        else {
            return refuse(ApplyError::Invalid("internal: not a remove operation".into()));
        };
        validate_name(name).map_err(ApplyError::from)?;
        let dir = self.resolve_dir(vol, parent)?;
        let ino = self
            .dirent(dir.ino, name)?
            .ok_or_else(|| ApplyError::NotFound(name.clone()))?;
        let o = self.object(ino)?.ok_or_else(|| ApplyError::NotFound(name.clone()))?;
        expect(op.expect_version, Some(&o), name)?;
        let is_dir = o.kind == Kind::Dir;
        if is_dir && !*recursive && self.has_children(o.ino)? {
            return refuse(ApplyError::NotEmpty(name.clone()));
        }
        self.drop_tree(vol, o, now_ns)?;
        self.put_dirent(dir.ino, name, None);
        let mut dir = self.object(dir.ino)?.unwrap_or(dir);
        if is_dir {
            dir.nlink = dir.nlink.saturating_sub(1);
        }
        self.touch_dir(dir, now_ns);
        Ok(0)
    }

    /// Moves a name, atomically replacing a compatible target (POSIX rename).
    fn op_rename(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        let OpKind::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
        } = &op.kind
        else {
            return refuse(ApplyError::Invalid("internal: not a rename operation".into()));
        };
        validate_name(from_name).map_err(ApplyError::from)?;
        validate_name(to_name).map_err(ApplyError::from)?;
        let src_dir = self.resolve_dir(vol, from_parent)?;
        let dst_dir = self.resolve_dir(vol, to_parent)?;
        let ino = self
            .dirent(src_dir.ino, from_name)?
            .ok_or_else(|| ApplyError::NotFound(from_name.clone()))?;
        let mut o = self
            .object(ino)?
            .ok_or_else(|| ApplyError::NotFound(from_name.clone()))?;
        expect(op.expect_version, Some(&o), from_name)?;
        if src_dir.ino == dst_dir.ino && from_name == to_name {
            return Ok(0);
        }
        if o.kind == Kind::Dir {
            self.check_not_into_itself(o.ino, dst_dir.ino, from_name)?;
        }
        let target = self.dirent(dst_dir.ino, to_name)?;
        if target == Some(o.ino) {
            // Two hard links to one file: POSIX says rename does nothing.
            return Ok(0);
        }
        if let Some(target) = target {
            self.replace_rename_target(vol, &o, &dst_dir, target, to_name, now_ns)?;
        }
        self.put_dirent(src_dir.ino, from_name, None);
        self.put_dirent(dst_dir.ino, to_name, Some(o.ino));
        let moved_dir = o.kind == Kind::Dir && src_dir.ino != dst_dir.ino;
        // Only a rename that moves the node (not one onto itself) tells what it moved from.
        self.op_prior = o.version;
        o.parent = dst_dir.ino;
        o.ctime_ns = now_ns;
        o.version = self.index;
        self.put_object(o);
        let mut s = self.object(src_dir.ino)?.unwrap_or(src_dir);
        if moved_dir {
            s.nlink = s.nlink.saturating_sub(1);
        }
        self.touch_dir(s, now_ns);
        let mut d = self.object(dst_dir.ino)?.unwrap_or(dst_dir);
        if moved_dir {
            d.nlink += 1;
        }
        self.touch_dir(d, now_ns);
        Ok(0)
    }

    /// Another name for a file or symlink.
    fn op_link(&mut self, vol: &mut VolumeRec, op: &Op, now_ns: i64) -> TxnResult<u64> {
        let OpKind::Link { node, parent, name } = &op.kind else {
            return refuse(ApplyError::Invalid("internal: not a link operation".into()));
        };
        validate_name(name).map_err(ApplyError::from)?;
        let mut o = self.resolve(vol, node)?;
        expect(op.expect_version, Some(&o), &describe(node))?;
        self.op_prior = o.version;
        if o.kind == Kind::Dir {
            return refuse(ApplyError::Denied(format!(
                "{}: directories cannot be hard-linked",
                describe(node)
            )));
        }
        let dir = self.resolve_dir(vol, parent)?;
        if self.dirent(dir.ino, name)?.is_some() {
            return refuse(ApplyError::Exists(name.clone()));
        }
        if o.nlink >= MAX_LINKS {
            return refuse(ApplyError::Invalid(format!(
                "{} already has {MAX_LINKS} links",
                describe(node)
            )));
        }
        o.nlink += 1;
        o.ctime_ns = now_ns;
        o.version = self.index;
        self.put_object(o.clone());
        self.put_dirent(dir.ino, name, Some(o.ino));
        let dir = self.object(dir.ino)?.unwrap_or(dir);
        self.touch_dir(dir, now_ns);
        Ok(0)
    }

    /// Refuses to move directory `moved` into `into` when that is `moved` itself or below it:
    /// walks up from `into` to the volume root, and refuses also when the walk does not reach
    /// the root (no cycle may ever form).
    fn check_not_into_itself(&self, moved: u64, into: u64, from_name: &str) -> TxnResult<()> {
        let mut cur = into;
        for _ in 0..MAX_DIR_DEPTH {
            if cur == moved {
                return refuse(ApplyError::Invalid(format!("cannot move {from_name} into itself")));
            }
            let c = self
                .object(cur)?
                .ok_or_else(|| ApplyError::NotFound(format!("node {cur:#x}")))?;
            if c.parent == cur {
                return Ok(());
            }
            cur = c.parent;
        }
        refuse(ApplyError::Invalid(format!(
            "directories nested deeper than {MAX_DIR_DEPTH} levels cannot be moved"
        )))
    }

    /// Takes away the name a rename replaces: a file or symlink for a non-directory, an empty
    /// directory for a directory (POSIX rename); anything else is refused.
    fn replace_rename_target(
        &mut self,
        vol: &mut VolumeRec,
        moved: &ObjectRec,
        dst_dir: &ObjectRec,
        target: u64,
        to_name: &str,
        now_ns: i64,
    ) -> TxnResult<()> {
        let t = self
            .object(target)?
            .ok_or_else(|| ApplyError::NotFound(to_name.to_string()))?;
        match (moved.kind == Kind::Dir, t.kind == Kind::Dir) {
            (false, true) => return refuse(ApplyError::IsDir(to_name.to_string())),
            (true, false) => return refuse(ApplyError::NotDir(to_name.to_string())),
            (true, true) if self.has_children(t.ino)? => return refuse(ApplyError::NotEmpty(to_name.to_string())),
            _ => {}
        }
        let target_is_dir = t.kind == Kind::Dir;
        self.unlink_object(vol, t, now_ns)?;
        if target_is_dir {
            let mut d = self.object(dst_dir.ino)?.unwrap_or_else(|| dst_dir.clone());
            d.nlink = d.nlink.saturating_sub(1);
            self.put_object(d);
        }
        Ok(())
    }
}

/// Refuses a file without content or a symlink without a usable target.
fn check_content(kind: Kind, hash: Option<&Hash>, symlink: &str, name: &str) -> TxnResult<()> {
    if kind == Kind::File && hash.is_none() {
        return refuse(ApplyError::Invalid(format!("file {name} has no content hash")));
    }
    if kind == Kind::Symlink && (symlink.is_empty() || symlink.len() > 4096 || symlink.contains('\0')) {
        return refuse(ApplyError::Invalid(format!(
            "symlink {name} needs a target of 1-4096 bytes without NUL"
        )));
    }
    Ok(())
}

/// The next node id of volume `vol`.
/// Most node ids one `Reserve` sets aside.
pub const MAX_RESERVE: u32 = 1 << 16;

/// Sets aside `count` node ids (see [`OpKind::Reserve`]); returns the first.
fn reserve(vol: &mut VolumeRec, count: u32) -> TxnResult<u64> {
    if count == 0 || count > MAX_RESERVE {
        return refuse(ApplyError::Invalid(format!(
            "reserve {count} node ids: between 1 and {MAX_RESERVE} at a time"
        )));
    }
    let first = vol.next_inode;
    let end = first + u64::from(count);
    if end - 1 > codafs_common::ids::MAX_LOCAL_INODE {
        return refuse(ApplyError::Invalid("inode numbers exhausted in this volume".into()));
    }
    vol.next_inode = end;
    Ok(make_ino(vol.id, first))
}

impl Txn<'_> {
    /// Checks that `ino` was reserved in `vol` and names no node.
    fn reserved_ino(&self, vol: &VolumeRec, ino: u64) -> TxnResult<u64> {
        let (id, local) = codafs_common::split_ino(ino);
        if id != vol.id || local <= VOLUME_ROOT_INODE || local >= vol.next_inode {
            return refuse(ApplyError::Invalid(format!(
                "node id {ino:#x} was not reserved in volume {}",
                vol.name
            )));
        }
        if self.object(ino)?.is_some() {
            return refuse(ApplyError::Exists(format!("node id {ino:#x}")));
        }
        Ok(ino)
    }
}

fn alloc_ino(vol: &mut VolumeRec) -> TxnResult<u64> {
    let local = vol.next_inode;
    if local > codafs_common::ids::MAX_LOCAL_INODE {
        return refuse(ApplyError::Invalid("inode numbers exhausted in this volume".into()));
    }
    vol.next_inode += 1;
    Ok(make_ino(vol.id, local))
}
