#!/usr/bin/env bash
# Build aloft's QEMU: Debian's own QEMU source (the version of the installed qemu-system-x86, with
# Debian's patches), configured for x86_64 with the microvm board and the virtio devices aloft uses
# and nothing else (qemu/aloft.mak, qemu/patches/*.patch). No display, audio, USB, PCI, SLIRP, TLS or
# image-format libraries: a binary half the size linking 9 libraries instead of ~50, which costs each
# machine less host memory and starts faster (ADR 0024). Cached by the hash of everything that goes
# into it.
#
#   scripts/build-qemu.sh [OUT]   (default OUT: target/guest/qemu-system-x86_64)
#
# Cache: ${ALOFT_CACHE:-~/.cache/aloft}/qemu/<hash>/qemu-system-x86_64; a second run only copies.
# The source comes through apt (`apt-get source`) from a private source list, so the host's apt
# configuration is left alone: ALOFT_DEBIAN_MIRROR (default http://deb.debian.org) picks the mirror.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/guest/qemu-system-x86_64}"
cache="${ALOFT_CACHE:-$HOME/.cache/aloft}/qemu"
src_ver="$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null)" || {
  echo "qemu: install the Debian package qemu-system-x86 first (scripts/setup.sh does): its version picks the source" >&2
  exit 1
}
patches=("$root"/qemu/patches/*.patch)
hash="$( { echo "$src_ver"; cat "$root/qemu/aloft.mak" "${patches[@]}" "$0"; } | sha256sum | cut -c1-16)"
dir="$cache/$hash"
mkdir -p "$(dirname "$out")"
if [ -x "$dir/qemu-system-x86_64" ]; then
  echo "qemu: cached $dir/qemu-system-x86_64 (Debian qemu $src_ver)"
  cp -f "$dir/qemu-system-x86_64" "$out"
  exit 0
fi
echo "qemu: building Debian qemu $src_ver for microvm (hash $hash); ~4 min on 2 cores"
work="$cache/build-$hash"
rm -rf "$work" && mkdir -p "$work/apt/lists/partial"
# a failed build (no source, a patch that does not apply, a compiler error) leaves nothing behind
trap 'rm -rf "$work"' EXIT

# The source package, through a source list of our own (deb-src lines for the release and its
# security updates, where Debian's current QEMU comes from).
. /etc/os-release
mirror="${ALOFT_DEBIAN_MIRROR:-http://deb.debian.org}"
cat > "$work/apt/sources.list" <<EOF
deb-src $mirror/debian $VERSION_CODENAME main
deb-src $mirror/debian $VERSION_CODENAME-updates main
deb-src $mirror/debian-security $VERSION_CODENAME-security main
EOF
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq source "qemu=$src_ver" >/dev/null) || {
  echo "qemu: could not fetch the source of qemu $src_ver from $mirror (set ALOFT_DEBIAN_MIRROR to a Debian mirror that has it)" >&2
  exit 1
}
src="$(find "$work" -maxdepth 1 -type d -name 'qemu-*' | head -n1)"
[ -n "$src" ] || { echo "qemu: apt-get source left no qemu-* directory in $work" >&2; exit 1; }
for p in "${patches[@]}"; do
  patch -s -p1 -d "$src" < "$p" || { echo "qemu: patch $p does not apply to qemu $src_ver" >&2; exit 1; }
done
cp "$root/qemu/aloft.mak" "$src/configs/devices/x86_64-softmmu/aloft.mak"

# Everything optional off (--without-default-features), then what machines need: both
# accelerators (KVM where the host has it, TCG otherwise), seccomp for `-sandbox on`, and libfdt,
# which the x86_64 target requires. Firmware (qboot, the PVH option ROM) comes from Debian's
# qemu-system-data and seabios packages.
mkdir -p "$work/build"
cd "$work/build"
"$src/configure" --prefix=/nonexistent --meson=/usr/bin/meson \
  --target-list=x86_64-softmmu --without-default-features --without-default-devices \
  --with-devices-x86_64=aloft --enable-kvm --enable-tcg --enable-seccomp --enable-fdt=system \
  --enable-malloc-trim --disable-debug-info --disable-install-blobs --audio-drv-list= \
  --firmwarepath=/usr/share/qemu:/usr/share/seabios >configure.log 2>&1 || {
  tail -n 30 configure.log >&2
  echo "qemu: configure failed (is a build dependency missing? scripts/setup.sh installs them)" >&2
  exit 1
}
ninja -j"$(nproc)" qemu-system-x86_64 >build.log 2>&1 || {
  grep -B2 -A12 FAILED build.log | tail -n 40 >&2
  echo "qemu: build failed (whole log: $work/build/build.log, removed on exit)" >&2
  exit 1
}
# Every device on aloft's command lines must be in the binary.
devices="$(./qemu-system-x86_64 -M microvm -device help)"
for d in virtio-blk-device virtio-net-device virtio-serial-device virtserialport virtio-balloon-device; do
  grep -q "\"$d\"" <<<"$devices" || { echo "qemu: the build lacks device $d: fix qemu/aloft.mak" >&2; exit 1; }
done
mkdir -p "$dir"
strip -o "$dir/qemu-system-x86_64" qemu-system-x86_64
cd /
cp -f "$dir/qemu-system-x86_64" "$out"
echo "qemu: built $dir/qemu-system-x86_64"
