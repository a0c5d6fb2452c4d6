//! Quorum arithmetic as a pure struct: how many acknowledgements a write has, whether it can
//! still succeed, and when to stop waiting. No I/O, so every case is a unit test.

/// Where a quorum write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumState {
    /// Still waiting for answers that could reach the quorum.
    Pending,
    /// Enough copies are durable.
    Reached,
    /// Too many targets failed for the quorum to be reachable.
    Failed,
}

/// Counts successes and failures among `targets` writes that need `needed` successes.
#[derive(Debug, Clone)]
pub struct QuorumTracker {
    needed: usize,
    targets: usize,
    ok: usize,
    failed: usize,
}

impl QuorumTracker {
    /// A write to `targets` places that needs `needed` of them. `needed` is capped at `targets`
    /// only by the caller's choice: asking for more than exist fails immediately.
    pub fn new(needed: usize, targets: usize) -> Self {
        QuorumTracker {
            needed,
            targets,
            ok: 0,
            failed: 0,
        }
    }

    pub fn ok(&mut self) -> QuorumState {
        self.ok += 1;
        self.state()
    }

    pub fn fail(&mut self) -> QuorumState {
        self.failed += 1;
        self.state()
    }

    pub fn successes(&self) -> usize {
        self.ok
    }

    pub fn state(&self) -> QuorumState {
        if self.ok >= self.needed {
            QuorumState::Reached
        } else if self.targets.saturating_sub(self.failed) < self.needed {
            QuorumState::Failed
        } else {
            QuorumState::Pending
        }
    }
}

/// Copies a blob write needs: the volume's write quorum, capped at the data replicas that exist
/// (a one-server development cluster can still write), and at least one.
pub fn effective_write_quorum(volume_quorum: u32, data_replicas: usize) -> usize {
    (volume_quorum.max(1) as usize).min(data_replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaches_fails_and_waits() {
        let mut q = QuorumTracker::new(2, 3);
        assert_eq!(q.state(), QuorumState::Pending);
        assert_eq!(q.fail(), QuorumState::Pending);
        assert_eq!(q.ok(), QuorumState::Pending);
        assert_eq!(q.ok(), QuorumState::Reached);
        let mut q = QuorumTracker::new(2, 3);
        q.ok();
        q.fail();
        assert_eq!(q.fail(), QuorumState::Failed);
        assert_eq!(QuorumTracker::new(3, 2).state(), QuorumState::Failed);
        assert_eq!(QuorumTracker::new(0, 0).state(), QuorumState::Reached);
    }

    #[test]
    fn effective_quorum_is_capped() {
        assert_eq!(effective_write_quorum(2, 3), 2);
        assert_eq!(effective_write_quorum(2, 1), 1);
        assert_eq!(effective_write_quorum(0, 3), 1);
        assert_eq!(effective_write_quorum(5, 3), 3);
    }
}
