#!/usr/bin/env bash
# The test command of README.md: every crate's tests, in release mode (numeric code is
# ~200x slower in debug). Uses only committed fixtures; downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo nextest run --release --locked --workspace --no-fail-fast "$@"
