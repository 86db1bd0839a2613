#!/usr/bin/env bash
# Start or stop a Ray cluster on a set of machines: the head on RAY_HEAD, one worker
# on each of RAY_WORKERS, over ssh (a host named localhost, 127.0.0.1 or this host's
# name runs here, without ssh). Submit jobs to it with launch/submit.sh.
#
#   RAY_HEAD=gpu-0 RAY_WORKERS="gpu-1 gpu-2 gpu-3" bash launch/ray_cluster.sh start
#   RAY_HEAD=gpu-0 RAY_WORKERS="gpu-1 gpu-2 gpu-3" bash launch/ray_cluster.sh status
#   RAY_HEAD=gpu-0 RAY_WORKERS="gpu-1 gpu-2 gpu-3" bash launch/ray_cluster.sh stop
#
# Variables:
#   RAY_HEAD            head host                                    [localhost]
#   RAY_WORKERS         worker hosts, space-separated                [none]
#   RAY_HEAD_IP         the head's address for workers and jobs      [first of `hostname -I` on the head]
#   RLPOST_DIR          the rlpost checkout on every machine, with the
#                       .venv of `bash launch/setup.sh gpu`          [this checkout]
#   RAY_PORT            the head's GCS port                          [6379]
#   RAY_DASHBOARD_HOST  interface of the dashboard / job server      [0.0.0.0]
#   RAY_DASHBOARD_PORT  its port (RAY_ADDRESS=http://<head>:<port>)  [8265]
#   RAY_NUM_CPUS, RAY_NUM_GPUS  resources each node offers           [what Ray detects]
#   RAY_START_ARGS      more `ray start` arguments for every node    [none]
#   SSH                 the remote shell                             [ssh]
#
# `stop` runs `ray stop` on every host, which ends every Ray process of the user
# there: use it on machines given to this cluster.
set -euo pipefail
action="${1:-}"
case "$action" in start|stop|status) ;; *)
  echo "usage: RAY_HEAD=host RAY_WORKERS='host ...' bash launch/ray_cluster.sh start|status|stop" >&2
  exit 2;;
esac
dir="${RLPOST_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
head="${RAY_HEAD:-localhost}"
workers="${RAY_WORKERS:-}"
port="${RAY_PORT:-6379}"
ray="$(printf %q "$dir/.venv/bin/ray")"
resources=""
[ -n "${RAY_NUM_CPUS:-}" ] && resources+=" --num-cpus=${RAY_NUM_CPUS}"
[ -n "${RAY_NUM_GPUS:-}" ] && resources+=" --num-gpus=${RAY_NUM_GPUS}"
extra="${RAY_START_ARGS:-}"

on() {  # on HOST COMMAND: run a shell command on HOST
  local host="$1"; shift
  case "$host" in
    localhost|127.0.0.1|"$(hostname)") bash -c "$*";;
    *) ${SSH:-ssh} "$host" "$*";;
  esac
}

head_ip="${RAY_HEAD_IP:-$(on "$head" "hostname -I | awk '{print \$1}'")}"
case "$action" in
  start)
    on "$head" "$ray start --head --node-ip-address=$head_ip --port=$port \
      --include-dashboard=true --dashboard-host=${RAY_DASHBOARD_HOST:-0.0.0.0} \
      --dashboard-port=${RAY_DASHBOARD_PORT:-8265} --disable-usage-stats$resources $extra"
    for w in $workers; do
      on "$w" "$ray start --address=$head_ip:$port --disable-usage-stats$resources $extra"
    done
    echo "Ray cluster up: head $head_ip:$port, $(wc -w <<< "$workers") workers;" \
         "submit jobs with RAY_ADDRESS=http://$head_ip:${RAY_DASHBOARD_PORT:-8265} bash launch/submit.sh ..."
    ;;
  status)
    on "$head" "$ray status --address=$head_ip:$port"
    ;;
  stop)
    for w in $workers; do on "$w" "$ray stop"; done
    on "$head" "$ray stop"
    ;;
esac
