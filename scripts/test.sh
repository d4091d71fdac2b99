#!/usr/bin/env bash
# The one test command: formatting, lints, every test including the ones that boot real guests
# (QEMU; TCG where KVM is unusable). Run scripts/setup.sh once first.
#
#   scripts/test.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

step_start=0
step() { step_start=$(date +%s); echo "==> $*"; }
done_step() { echo "    ($(( $(date +%s) - step_start )) s)"; }

step "cargo fmt --check"
cargo fmt --all --check
done_step

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
done_step

step "tests (unit + real-VM)"
profile=default; [ -n "${CI:-}" ] && profile=ci
cargo nextest run --workspace --all-features --profile "$profile"
done_step

step "doc tests"
cargo test --workspace --doc --quiet
done_step
