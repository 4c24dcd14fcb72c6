#!/usr/bin/env bash
# Join this node to a running Ray cluster as a worker.
#
#   launch/cluster/start_worker.sh HEAD_ADDR        HEAD_ADDR = IP or IP:PORT of the head's GCS
#
# Environment (all optional):
#   MINILLM_RAY_PORT=6379            port used when HEAD_ADDR has none
#   MINILLM_NUM_CPUS, MINILLM_NUM_GPUS   resources this node offers (default: what Ray detects)
#   MINILLM_NODE_IP                  address to advertise (multi-NIC nodes)
#   MINILLM_RAY_BLOCK=0              1: stay in the foreground (containers, srun)
#   MINILLM_RAY_TEMP_DIR             Ray's session folder (default /tmp/ray)
#   MINILLM_RAY_EXTRA                extra `ray start` flags, split on spaces
#   RAY_AUTH_MODE=token              token (default; same token on every machine) or disabled (everywhere)
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}
if [[ $# -ne 1 ]]; then
    echo "start_worker.sh: expected exactly one argument, HEAD_ADDR; got $#" >&2
    usage 2
fi
case "$1" in
    -h|--help) usage 0 ;;
    -*|"") echo "start_worker.sh: HEAD_ADDR must be an IP or IP:PORT, got '$1'" >&2; usage 2 ;;
esac
head="$1"
[[ "$head" == *:* ]] || head="$head:${MINILLM_RAY_PORT:-6379}"

# Ray 2.60 token authentication: head, workers and submitters must run in one mode (another is refused).
# token (the default here): the same token on every machine, from a shared ~/.ray/auth_token or
# `export RAY_AUTH_TOKEN=<the head's \`ray get-auth-token\`>`; RAY_AUTH_MODE=disabled everywhere on a trusted network.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

args=(--address="$head" --disable-usage-stats)
[[ -n "${MINILLM_NUM_CPUS:-}" ]] && args+=(--num-cpus="$MINILLM_NUM_CPUS")
[[ -n "${MINILLM_NUM_GPUS:-}" ]] && args+=(--num-gpus="$MINILLM_NUM_GPUS")
[[ -n "${MINILLM_NODE_IP:-}" ]] && args+=(--node-ip-address="$MINILLM_NODE_IP")
[[ -n "${MINILLM_RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$MINILLM_RAY_TEMP_DIR")
[[ "${MINILLM_RAY_BLOCK:-0}" == 1 ]] && args+=(--block)
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
[[ -n "${MINILLM_RAY_EXTRA:-}" ]] && args+=(${MINILLM_RAY_EXTRA})

echo "start_worker.sh: ray start ${args[*]}" >&2
exec ray start "${args[@]}"
