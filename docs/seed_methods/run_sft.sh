#!/usr/bin/env bash
# ssToken against plain SFT on the quickstart's warm-up demonstrations (docs/seed_methods.md,
# "ssToken against plain SFT"): per seed, the data, both arms, `rlpost eval` of each final
# model, the selection analysis of the ssToken run; then the tables.
#
#   docs/seed_methods/run_sft.sh [OUT_DIR [SEED ...]]      (default: /tmp/seed_runs/sft 0 1 2)
#
# Run from the repository root (the code imported is that tree's: PYTHONPATH is set to it).
# PYTHON names the interpreter (default: python); SFT_OVERRIDES, overrides for both arms'
# `rlpost sft` (e.g. "steps=100 save_every=50" for a short try). Runs go one at a time; an OUT_DIR/seedS/ARM
# that exists stops the script rather than be mixed with a new run.
set -euo pipefail
# shellcheck disable=SC2086  # SEEDS and SFT_OVERRIDES are lists of words

OUT=${1:-/tmp/seed_runs/sft}
SEEDS=${*:2}
SEEDS=${SEEDS:-0 1 2}
PYTHON=${PYTHON:-python}
export RLPOST_THREADS=${RLPOST_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=configs/seed_methods/sft_arithmetic.yaml

"$PYTHON" -c 'import rlpost, rlpost.algorithms.sstoken as s; print("code:", rlpost.__file__, s.__file__)'

timed() { # FILE COMMAND...: runs COMMAND, then writes its wall seconds into FILE
  local file=$1 t0
  shift
  t0=$(date +%s.%N)
  "$@"
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }' >"$file"
}

for s in $SEEDS; do
  dir=$OUT/seed$s
  mkdir -p "$dir"
  "$PYTHON" docs/seed_methods/make_sft_data.py --seed "$s" --out "$dir/data.jsonl"
  for arm in sft sstoken; do
    if [ -e "$dir/$arm" ]; then
      echo "$dir/$arm exists: remove it to run this arm again" >&2
      exit 1
    fi
    extra=()
    if [ "$arm" = sstoken ]; then extra=(algorithm.name=sstoken); fi
    echo "== seed $s, $arm: training"
    timed "$dir/$arm.wall_s" "$PYTHON" -m rlpost.cli sft "$CONFIG" data.path="$dir/data.jsonl" \
      seed="$s" output_dir="$dir/$arm" ${SFT_OVERRIDES:-} "${extra[@]}" >"$dir/$arm.log" 2>&1 </dev/null
    echo "$(cat "$dir/$arm.wall_s") s"
    run=$(ls -d "$dir/$arm"/*/)
    echo "== seed $s, $arm: eval"
    timed "$dir/$arm.eval_wall_s" "$PYTHON" -m rlpost.cli eval configs/quickstart.yaml \
      model.path="${run}final_model" mode=inprocess seed="$s" eval.n=4 name="$arm" \
      output_dir="$dir/eval" >"$dir/$arm.eval.log" 2>&1 </dev/null
    echo "$(cat "$dir/$arm.eval_wall_s") s; $(grep -E '^eval/accuracy_greedy' "$dir/$arm.eval.log")"
  done
  echo "== seed $s: selection analysis"
  "$PYTHON" docs/seed_methods/sstoken_selection.py --run "$(ls -d "$dir/sstoken"/*/)" \
    --data "$dir/data.jsonl" >"$dir/selection.md" 2>"$dir/selection.log"
  head -n 2 "$dir/selection.md"
done
"$PYTHON" docs/seed_methods/sft_summary.py "$OUT" $SEEDS | tee "$OUT/summary.md"
