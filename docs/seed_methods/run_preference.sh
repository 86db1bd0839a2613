#!/usr/bin/env bash
# T-REG and cDPO against plain DPO on the cDPO quickstart pipeline (docs/seed_methods.md):
# per seed, the pipeline with T-REG as its weighted stage, then the default pipeline (cDPO).
# Each pipeline trains its own plain-DPO baseline on the same pairs from the same start.
#   docs/seed_methods/run_preference.sh OUT_DIR [SEED ...]      (default seeds: 0 1 2)
set -euo pipefail
out=${1:?usage: run_preference.sh OUT_DIR [SEED ...]}
shift
seeds=("${@:-0 1 2}")
python=${PYTHON:-.venv/bin/python}
export RLPOST_THREADS=${RLPOST_THREADS:-1} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for seed in ${seeds[@]}; do
  "$python" -m rlpost.cli cdpo configs/cdpo_quickstart.yaml seed="$seed" mode=inprocess \
    output_dir="$out/treg" cdpo.dpo.algorithm.loss=treg
  "$python" -m rlpost.cli cdpo configs/cdpo_quickstart.yaml seed="$seed" mode=inprocess \
    output_dir="$out/cdpo"
done
