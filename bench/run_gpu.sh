#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, one after another (an H100 takes ~10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests/gpu/test_gpu.py tests/model/test_token_kl.py tests/model/test_fused_kernels.py
python bench/logprob_memory.py
python bench/learner_update.py --shape qwen2.5-1.5b --arms rlpost:packed,rlpost:packed:off,rlpost:padded,naive,trl
python bench/learner_update.py --shape qwen2.5-0.5b
