#!/usr/bin/env bash
# Submit a training run or a sweep to a running Ray cluster as a Ray job (`ray job
# submit`). The job runs `rlpost train|sweep` on the head node from RLPOST_DIR, with
# ray.address=auto so its workers go to the cluster; the runtime environment carries
# the variables named in RLPOST_ENV_VARS. Waits for the job, streaming its logs, and
# exits 1 if it failed.
#
#   RAY_ADDRESS=http://gpu-0:8265 bash launch/submit.sh train configs/quickstart.yaml seed=1
#   RAY_ADDRESS=http://gpu-0:8265 bash launch/submit.sh sweep configs/sweeps/aggregation.yaml
#
# Variables:
#   RAY_ADDRESS        the cluster's job server, http://<head>:8265               [required]
#   RLPOST_DIR         the rlpost checkout (and .venv) on the head node; config
#                      paths are relative to it                                   [this checkout]
#   RLPOST_OUTPUT_DIR  where runs go (sweeps: under sweeps/), as the head sees it [$RLPOST_DIR/runs]
#   RLPOST_ENV_VARS    variables passed to the job when set here
#                      [WANDB_API_KEY WANDB_MODE WANDB_ENTITY WANDB_PROJECT HF_HOME HF_TOKEN]
#   RLPOST_JOB_ID      the job's submission id                                    [rlpost-<command>-<time>]
#   RLPOST_NO_WAIT=1   return once submitted (then: ray job logs -f <id>)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
command="${1:-}"
if [[ $# -lt 2 || ( "$command" != train && "$command" != sweep ) ]]; then
  echo "usage: RAY_ADDRESS=http://<head>:8265 bash launch/submit.sh train|sweep FILE [key=value ...]" >&2
  exit 2
fi
shift
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster job server, e.g. http://head:8265}"
dir="${RLPOST_DIR:-$here}"
out="${RLPOST_OUTPUT_DIR:-$dir/runs}"
# our output directory first, so that one given on the command line wins
if [ "$command" = train ]; then args=("$1" "output_dir=$out" "${@:2}"); else args=(--output-dir "$out/sweeps" "$@"); fi
args+=("ray.address=auto")  # inside a Ray job, RAY_ADDRESS points at this cluster
entrypoint="cd $(printf %q "$dir") && exec .venv/bin/python -m rlpost.cli $command$(printf ' %q' "${args[@]}")"

# shellcheck disable=SC2086  # RLPOST_ENV_VARS is a list of names
runtime_env="$("$here/.venv/bin/python" -c '
import json, os, sys
env = {name: os.environ[name] for name in sys.argv[1:] if name in os.environ}
print(json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1", **env}}))
' ${RLPOST_ENV_VARS:-WANDB_API_KEY WANDB_MODE WANDB_ENTITY WANDB_PROJECT HF_HOME HF_TOKEN})"

# Ray (2.60) turns token authentication on for a cluster whose head found a token
# (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN); send ours the same way.
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ) ]]; then
  export RAY_AUTH_MODE=token
fi
submit=(--address "$RAY_ADDRESS" --submission-id "${RLPOST_JOB_ID:-rlpost-$command-$(date +%Y%m%d-%H%M%S)}"
        --runtime-env-json "$runtime_env")
[ "${RLPOST_NO_WAIT:-0}" = 1 ] && submit+=(--no-wait)
exec "$here/.venv/bin/ray" job submit "${submit[@]}" -- bash -c "$entrypoint"
