#!/usr/bin/env bash
# Start the Ray head on this node (Ray 2.60, from the `ray[default]` dependency).
#
#   launch/cluster/start_head.sh
#
# Environment (all optional):
#   MINILLM_RAY_PORT=6379            GCS port workers join (start_worker.sh HEAD_IP:PORT)
#   MINILLM_DASHBOARD_PORT=8265      dashboard + job API (`ray job submit --address http://HEAD_IP:8265`)
#   MINILLM_INCLUDE_DASHBOARD=true   the job API needs it; false starts faster (tests)
#   MINILLM_NUM_CPUS, MINILLM_NUM_GPUS   resources this node offers (default: what Ray detects)
#   MINILLM_NODE_IP                  address to advertise (multi-NIC nodes); default: Ray's choice
#   MINILLM_RAY_BLOCK=0              1: stay in the foreground (containers, srun); Ctrl-C / SIGTERM stops the node
#   MINILLM_RAY_TEMP_DIR             Ray's session folder (default /tmp/ray)
#   MINILLM_RAY_EXTRA                extra `ray start` flags, split on spaces
#   RAY_AUTH_MODE=token              token (default; same token on every machine) or disabled (everywhere)
# Stop with `ray stop` on this node (which stops every Ray process of this user here).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}
if [[ $# -gt 0 ]]; then
    case "$1" in
        -h|--help) usage 0 ;;
        *) echo "start_head.sh: unexpected argument '$1' (configure with the MINILLM_* variables)" >&2; usage 2 ;;
    esac
fi

# Ray 2.60 token authentication: head, workers and submitters must run in one mode (another is refused).
# token (the default here): the same token on every machine, from a shared ~/.ray/auth_token or
# `export RAY_AUTH_TOKEN=<the head's \`ray get-auth-token\`>`; RAY_AUTH_MODE=disabled everywhere on a trusted network.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
[[ "$RAY_AUTH_MODE" == token ]] && ray get-auth-token --generate >/dev/null  # makes ~/.ray/auth_token if missing

args=(--head
      --port="${MINILLM_RAY_PORT:-6379}"
      --include-dashboard="${MINILLM_INCLUDE_DASHBOARD:-true}"
      --dashboard-host=0.0.0.0            # the job API must be reachable from the submitting machine
      --dashboard-port="${MINILLM_DASHBOARD_PORT:-8265}"
      --disable-usage-stats)
[[ -n "${MINILLM_NUM_CPUS:-}" ]] && args+=(--num-cpus="$MINILLM_NUM_CPUS")
[[ -n "${MINILLM_NUM_GPUS:-}" ]] && args+=(--num-gpus="$MINILLM_NUM_GPUS")
[[ -n "${MINILLM_NODE_IP:-}" ]] && args+=(--node-ip-address="$MINILLM_NODE_IP")
[[ -n "${MINILLM_RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$MINILLM_RAY_TEMP_DIR")
[[ "${MINILLM_RAY_BLOCK:-0}" == 1 ]] && args+=(--block)
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
[[ -n "${MINILLM_RAY_EXTRA:-}" ]] && args+=(${MINILLM_RAY_EXTRA})

echo "start_head.sh: ray start ${args[*]}" >&2
exec ray start "${args[@]}"
