#!/usr/bin/env bash
# Quick start: install packages, build codafs, and run `codafs demo` (a local 3-server cluster
# with volume `www` mounted at /coda). Arguments go to `codafs demo` (e.g. --mount /mnt/coda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/codafs-target}"
echo "building codafs (the first build compiles RocksDB: 15-20 minutes on two cores)..."
cargo build --bin codafs
exec "$CARGO_TARGET_DIR/debug/codafs" demo "$@"
