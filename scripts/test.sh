#!/usr/bin/env bash
# The test command of README.md: every crate's tests, in release mode (numeric code is
# ~200x slower in debug). Uses only committed fixtures; the one download is the official
# openai Python client (PyPI, pinned) that the `uc serve` tests drive the server with.
set -euo pipefail
cd "$(dirname "$0")/.."
# UC_TEST_PYTHON may name a Python that has it; otherwise it goes into .venv (once).
# Without it the serve test fails, saying so.
if [ -z "${UC_TEST_PYTHON:-}" ]; then
    if ! .venv/bin/python -c 'import openai' 2>/dev/null; then
        python3 -m venv .venv
        .venv/bin/pip install --quiet -r scripts/requirements-serve-test.txt
    fi
    export UC_TEST_PYTHON="$PWD/.venv/bin/python"
fi
exec cargo nextest run --release --locked --workspace --no-fail-fast "$@"
