#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, one after another (an H100 takes ~10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests/test_gpu.py
python bench/logprob_memory.py
python bench/learner_update.py --shape qwen2.5-1.5b
python bench/learner_update.py --shape qwen2.5-0.5b
