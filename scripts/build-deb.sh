#!/usr/bin/env bash
# Builds codafs_VERSION_ARCH.deb: build once, install on every server and web node with
# `apt install ./codafs_*.deb` (or `dpkg -i`; it needs fuse3).
#
# Usage: scripts/build-deb.sh [--release] [--binary PATH] [--out DIR]
#   --release      build with the release profile (what you ship; the first release build
#                  compiles RocksDB again, 15-20 minutes on two cores)
#   --binary PATH  package this codafs binary instead of building one
#   --out DIR      where the .deb goes (default: the current directory)
#
# The package holds:
#   /usr/bin/codafs, /sbin/mount.codafs (a link: mount(8) runs it for codafs lines in fstab)
#   /lib/systemd/system/codafs-server.service, codafs-mount.service
#   /etc/default/codafs-server, /etc/default/codafs-mount (conffiles: their settings)
#   /usr/share/man/man1/codafs*.1.gz (from each command's --help)
#   /usr/share/bash-completion/completions/codafs, zsh and fish completions
#   /usr/share/doc/codafs/ (README, OPERATIONS, CONFIGURATION, SECURITY, SEMANTICS)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
binary=""
out="$PWD"
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --binary) binary="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$binary" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/codafs-target}"
  if [ "$profile" = release ]; then cargo build --release --locked --bin codafs; else cargo build --locked --bin codafs; fi
  binary="$CARGO_TARGET_DIR/$profile/codafs"
fi
[ -x "$binary" ] || { echo "build-deb.sh: no executable at $binary" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/codafs_${version}_${arch}"

install -D -m 0755 "$binary" "$root/usr/bin/codafs"
mkdir -p "$root/sbin"
ln -s ../usr/bin/codafs "$root/sbin/mount.codafs"
install -D -m 0644 packaging/systemd/codafs-server.service "$root/lib/systemd/system/codafs-server.service"
install -D -m 0644 packaging/systemd/codafs-mount.service "$root/lib/systemd/system/codafs-mount.service"
install -D -m 0644 packaging/default/codafs-server "$root/etc/default/codafs-server"
install -D -m 0644 packaging/default/codafs-mount "$root/etc/default/codafs-mount"
for doc in README.md docs/OPERATIONS.md docs/CONFIGURATION.md docs/SECURITY.md docs/SEMANTICS.md; do
  install -D -m 0644 "$doc" "$root/usr/share/doc/codafs/$(basename "$doc")"
done

# Shell completions, from the binary itself.
"$binary" completions bash | install -D -m 0644 /dev/stdin "$root/usr/share/bash-completion/completions/codafs"
"$binary" completions zsh | install -D -m 0644 /dev/stdin "$root/usr/share/zsh/vendor-completions/_codafs"
"$binary" completions fish | install -D -m 0644 /dev/stdin "$root/usr/share/fish/vendor_completions.d/codafs.fish"

# Man pages: each command's --help, one page per command and subcommand.
man="$root/usr/share/man/man1"
mkdir -p "$man"
manpage() { # manpage NAME ARGS...: the page for `codafs ARGS... --help`
  local name="$1"; shift
  local upper; upper="$(echo "$name" | tr '[:lower:]' '[:upper:]')"
  {
    echo ".TH $upper 1 \"\" \"codafs $version\" \"codafs manual\""
    echo ".SH NAME"
    echo "$name"
    echo ".SH DESCRIPTION"
    echo ".nf"
    # roff: a leading dot or quote would be a request, a backslash an escape.
    "$binary" "$@" --help | sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"
    echo ".fi"
    echo ".SH SEE ALSO"
    echo "/usr/share/doc/codafs/OPERATIONS.md"
  } | gzip -9n > "$man/$name.1.gz"
}
# The subcommands a --help lists (the indented names of its "Commands:" section).
subcommands() {
  "$binary" "$@" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR>1 && NF {print $1}' | grep -v '^help$' || true
}
manpage codafs
for sub in $(subcommands); do
  manpage "codafs-$sub" "$sub"
  for subsub in $(subcommands "$sub"); do
    manpage "codafs-$sub-$subsub" "$sub" "$subsub"
  done
done

installed_kb="$(du -sk "$root" | cut -f1)"
mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: codafs
Version: $version
Architecture: $arch
Maintainer: codafs developers <codafs@localhost>
Installed-Size: $installed_kb
Depends: fuse3
Section: net
Priority: optional
Homepage: https://github.com/codafs/codafs
Description: replicated, caching distributed filesystem for web content
 Replica servers hold volumes under read/write quorum; web nodes mount one
 /coda namespace through FUSE with a persistent whole-file cache and callback
 invalidation. One binary: servers, mounts, administration and publishing.
CONTROL
printf '/etc/default/codafs-server\n/etc/default/codafs-mount\n' > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# New units: make systemd see them (nothing is enabled or started: set up first, see
# /usr/share/doc/codafs/OPERATIONS.md, then `systemctl enable --now codafs-server` or
# `codafs-mount`).
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTINST
chmod 0755 "$root/DEBIAN/postinst"

mkdir -p "$out"
# gzip: several times faster to build than xz for a package that is mostly one binary.
dpkg-deb --build --root-owner-group -Zgzip "$root" "$out" >/dev/null
echo "$out/codafs_${version}_${arch}.deb"
