//! Shared helpers for the benchmarks live in `codafs-tests`; this crate only holds bench targets.
