#!/usr/bin/env bash
# The one setup command: system packages, the jail user, the guest kernel, the workspace and the guest
# initramfs. Idempotent; a second run takes seconds (packages present, kernel cached by hash, cargo
# incremental).
#
#   scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

step_start=0
step() { step_start=$(date +%s); echo "==> $*"; }
done_step() { echo "    ($(( $(date +%s) - step_start )) s)"; }

# Debian packages (bookworm). qemu-system-x86: the firmware (qboot, PVH option ROM) and the version
# whose source scripts/build-qemu.sh builds aloft's microvm-only QEMU from (ninja-build, meson,
# pkg-config and the -dev packages: its build); linux-source-6.1 + build tools: the guest kernel;
# busybox-static, e2fsprogs, erofs-utils: test root filesystems; iproute2: taps and netns.
# docker-registry: the embedded OCI registry (and the tests' one); skopeo, umoci: interop tests and
# the image benchmark's baseline. debootstrap: `aloft images bootstrap debian` builds debian:bookworm.
# buildah: `aloft deploy` and `aloft launch` build Dockerfiles with it (vfs storage, chroot isolation).
# pebble: Let's Encrypt's test CA, which aloft-acme's tests issue certificates from.
# etcd-server: the control store of `aloftd --etcd` (aloft-etcd's and aloftd's tests start their own).
# wrk, nginx: `cargo xtask bench proxy` (load generator; baseline reverse proxy and backend).
packages=(
  qemu-system-x86 linux-source-6.1 build-essential flex bison libelf-dev bc cpio xz-utils kmod patch
  ninja-build meson pkg-config libglib2.0-dev libpixman-1-dev libseccomp-dev libfdt-dev zlib1g-dev
  busybox-static e2fsprogs erofs-utils iproute2 procps nftables libsqlite3-dev
  docker-registry skopeo umoci debootstrap buildah pebble wrk nginx bind9-dnsutils etcd-server
)
step "system packages"
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "    installed: ${missing[*]}"
  # The Debian package enables a system-wide registry on :5000; aloft (and the tests) start their
  # own on loopback, so a systemd host gets that one stopped and disabled.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    $sudo_cmd systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
  # Likewise etcd's system-wide member on :2379: the tests start a private etcd each (free ports,
  # a temporary data directory), and an operator points `aloftd --etcd` at a cluster they set up.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
    $sudo_cmd systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
  # Likewise nginx's system-wide server on :80: the proxy benchmark runs its own nginx processes
  # (own config, prefix and pid file), so the packaged service is stopped and kept from booting.
  if [[ " ${missing[*]} " == *" nginx "* ]]; then
    if [ -d /run/systemd/system ]; then
      $sudo_cmd systemctl disable --now nginx.service >/dev/null 2>&1 || true
    else
      $sudo_cmd service nginx stop >/dev/null 2>&1 || true
      $sudo_cmd update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
  fi
else
  echo "    all present"
fi
done_step

step "jail user aloft-vm (QEMU drops to it)"
if ! id aloft-vm >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin aloft-vm
  getent group kvm >/dev/null && $sudo_cmd usermod -aG kvm aloft-vm
  echo "    created"
else
  echo "    present"
fi
done_step

step "guest kernel"
scripts/build-kernel.sh "$root/target/guest/vmlinux"
done_step

step "QEMU (microvm only, from Debian's source)"
scripts/build-qemu.sh "$root/target/guest/qemu-system-x86_64"
done_step

step "workspace build"
cargo build --workspace --all-targets --all-features --quiet
done_step

step "guest initramfs (static aloft-init)"
cargo xtask guest
done_step
