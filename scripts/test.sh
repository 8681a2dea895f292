#!/usr/bin/env bash
# The test command of README.md: every crate's tests, in release mode (numeric code is
# ~200x slower in debug). Uses only committed fixtures; downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The `uc serve` tests drive the server with the official openai Python client; .ci/run
# installs it into .venv (python3 -m venv .venv && .venv/bin/pip install -r
# scripts/requirements-serve-test.txt). Without it that test fails, saying so.
if [ -z "${UC_TEST_PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    export UC_TEST_PYTHON="$PWD/.venv/bin/python"
fi
exec cargo nextest run --release --locked --workspace --no-fail-fast "$@"
