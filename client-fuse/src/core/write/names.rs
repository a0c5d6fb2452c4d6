//! Write-back unlink, rmdir, rename and link: checked against what this mount shows (its
//! unsent changes over the servers' namespace), logged, and shown at once. They reach the
//! servers with the batch they fall in (see `batch.rs`): a remove only if the node is still
//! the version this mount saw, a rename only if its target name still holds what this mount saw
//! there, so someone else's change made meanwhile is kept, not overwritten.
use super::*;
use crate::core::types::Seen;

/// Directory levels walked to check that a directory is not moved into itself.
const MAX_DEPTH: usize = 4096;
/// Checks of a rename that racing changes keep making stale, before `ESTALE` is returned.
const RENAME_TRIES: u32 = 3;

impl<R: Remote> Core<R> {
    /// What this mount shows of the node `a`, as a logged change records it.
    async fn seen(&self, a: &NodeAttr) -> Result<Seen, FsError> {
        Ok(Seen {
            ino: a.ino,
            version: self.attr(a.ino).await?.version,
            kind: a.kind,
        })
    }

    /// `unlink` or `rmdir`, logged.
    pub(super) async fn remove_logged(
        &self,
        c: Caller,
        ctx: &WriteCtx,
        parent: u64,
        name: &str,
        dir: bool,
    ) -> Result<(), FsError> {
        let b = self.logging()?;
        let child = self.lookup(parent, name).await?;
        match (dir, child.kind == NodeKind::Dir) {
            (false, true) => return Err(FsError::IsDir),
            (true, false) => return Err(FsError::NotDir),
            (true, true) if !self.listing(child.ino, false).await?.is_empty() => return Err(FsError::NotEmpty),
            _ => {}
        }
        let op = Op::Remove {
            parent,
            name: name.to_string(),
            seen: Some(self.seen(&child).await?),
            expect: None,
        };
        b.log_change(&ctx.volume, c.uid, op, None, false).await?;
        self.forgot_name(parent, name);
        self.unlinked_here(child.ino).await;
        Ok(())
    }

    /// `rename`, logged. `from` and `to` are (directory, name). A rename whose checks a racing
    /// change here made stale (see `BackState::admits`) is checked again, a few times.
    pub(super) async fn rename_logged(
        &self,
        c: Caller,
        ctx: &WriteCtx,
        from: (u64, &str),
        to: (u64, &str),
        noreplace: bool,
    ) -> Result<(), FsError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.rename_logged_once(c, ctx, from, to, noreplace).await {
                Err(FsError::Stale) if tries < RENAME_TRIES => continue,
                r => return r,
            }
        }
    }

    async fn rename_logged_once(
        &self,
        c: Caller,
        ctx: &WriteCtx,
        (parent, name): (u64, &str),
        (new_parent, new_name): (u64, &str),
        noreplace: bool,
    ) -> Result<(), FsError> {
        let b = self.logging()?;
        let src = self.lookup(parent, name).await?;
        let dst = match self.lookup(new_parent, new_name).await {
            Ok(a) => Some(a),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some(d) = &dst {
            if noreplace {
                return Err(FsError::Exists);
            }
            // The same node (the same name, or two links of one file): POSIX does nothing.
            if d.ino == src.ino {
                return Ok(());
            }
            match (src.kind == NodeKind::Dir, d.kind == NodeKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.listing(d.ino, false).await?.is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        if src.kind == NodeKind::Dir {
            self.check_not_into_itself(src.ino, new_parent).await?;
        }
        let replaces = match &dst {
            Some(d) => Some(self.seen(d).await?),
            None => None,
        };
        let op = Op::Rename {
            from_parent: parent,
            from_name: name.to_string(),
            to_parent: new_parent,
            to_name: new_name.to_string(),
            seen: Some(self.seen(&src).await?),
            replaces,
        };
        b.log_change(&ctx.volume, c.uid, op, None, false).await?;
        self.forgot_name(parent, name);
        self.told_name(new_parent, new_name, src.ino);
        if let Some(d) = dst {
            self.unlinked_here(d.ino).await;
        }
        Ok(())
    }

    /// `link`, logged (`l` is the [`Op::Link`]).
    pub(super) async fn link_logged(&self, c: Caller, ctx: &WriteCtx, l: Op) -> Result<NodeAttr, FsError> {
        let b = self.logging()?;
        let Op::Link { ino, parent, name, .. } = &l else {
            return Err(FsError::Io("internal: link_logged takes a link".into()));
        };
        let (ino, parent, name) = (*ino, *parent, name.clone());
        match self.lookup(parent, &name).await {
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        b.log_change(&ctx.volume, c.uid, l, None, false).await?;
        self.told_name(parent, &name, ino);
        self.getattr(ino).await
    }

    /// Refuses to move directory `moved` into `into` when that is `moved` itself or below it,
    /// as this mount shows the tree (the servers check again when the rename arrives).
    async fn check_not_into_itself(&self, moved: u64, into: u64) -> Result<(), FsError> {
        let mut cur = into;
        for _ in 0..MAX_DEPTH {
            if cur == moved {
                return Err(FsError::Invalid("cannot move a directory into itself".into()));
            }
            let a = self.attr(cur).await?;
            if a.parent == cur || a.parent == 0 {
                return Ok(());
            }
            cur = a.parent;
        }
        Err(FsError::Invalid(format!(
            "directories nested deeper than {MAX_DEPTH} levels cannot be moved"
        )))
    }

    /// A node lost a name here: if that was its last and it is open for writing, what is
    /// written to it from now on goes nowhere.
    async fn unlinked_here(&self, ino: u64) {
        let last = matches!(self.attr(ino).await, Ok(a) if a.nlink == 0 && a.kind != NodeKind::Dir);
        if let (true, Some(sh)) = (last, self.writes.shadow(ino)) {
            lock(&sh).unlinked = true;
        }
    }
}
