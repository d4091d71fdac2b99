#!/usr/bin/env bash
# Build the aloft guest kernel (an uncompressed vmlinux booted directly through PVH) from Debian's
# linux-source-6.1, kernel/patches/*.patch and kernel/microvm.config, cached by the hash of everything
# that goes into it.
#
#   scripts/build-kernel.sh [OUT]   (default OUT: target/guest/vmlinux)
#
# Cache: ${ALOFT_CACHE:-~/.cache/aloft}/kernel/<hash>/vmlinux; a second run only copies.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/guest/vmlinux}"
cache="${ALOFT_CACHE:-$HOME/.cache/aloft}/kernel"
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "missing $src_tar: install the Debian package linux-source-6.1 (scripts/setup.sh does)" >&2; exit 1; }
src_ver="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
patches=("$root"/kernel/patches/*.patch)
hash="$( { echo "$src_ver"; cat "$root/kernel/microvm.config" "${patches[@]}" "$0"; } | sha256sum | cut -c1-16)"
dir="$cache/$hash"
mkdir -p "$(dirname "$out")"
if [ -f "$dir/vmlinux" ]; then
  echo "kernel: cached $dir/vmlinux (linux-source $src_ver)"
  cp -f "$dir/vmlinux" "$out"
  exit 0
fi
echo "kernel: building linux-source $src_ver with kernel/microvm.config (hash $hash); ~10 min on 2 cores"
work="$cache/build-$hash"
rm -rf "$work" && mkdir -p "$work"
# a failed build (a patch that does not apply, a config error) leaves no source tree behind
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$src_tar"
cd "$work/linux-source-6.1"
for p in "${patches[@]}"; do
  patch -s -p1 < "$p" || { echo "kernel: patch $p does not apply to linux-source $src_ver" >&2; exit 1; }
done
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$root/kernel/microvm.config" >/dev/null
make -s olddefconfig
# every line of our config must have survived olddefconfig: a silently dropped option is a bug
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "kernel: option not applied: $line" >&2; missing=1; } ;; esac
done < "$root/kernel/microvm.config"
[ "$missing" = 0 ] || { echo "kernel: fix kernel/microvm.config (dependencies of the options above)" >&2; exit 1; }
make -s -j"$(nproc)" vmlinux
strip --strip-debug -o vmlinux.stripped vmlinux
mkdir -p "$dir"
cp .config "$dir/config"
mv vmlinux.stripped "$dir/vmlinux"
cd /
cp -f "$dir/vmlinux" "$out"
echo "kernel: built $dir/vmlinux"
