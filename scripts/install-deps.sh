#!/usr/bin/env bash
# Installs the system packages codafs needs to build and run (Debian/Ubuntu, as root):
# clang/libclang for RocksDB's bindings, fuse3 for the mount and fusermount3, rsync for the
# tests and benchmarks that publish the way webmasters do, nginx for the web-farm test
# (tests/tests/webfarm.rs; it runs its own instances on loopback ports).
# protoc comes from the protoc-bin-vendored crate, so it is not needed here.
set -euo pipefail
pkgs=(clang libclang-dev fuse3 libfuse3-dev pkg-config rsync nginx)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: codafs mounts cannot work here" >&2; exit 1; }
