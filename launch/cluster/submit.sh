#!/usr/bin/env bash
# Submit a training run to a running Ray cluster through the job API.
#
#   launch/cluster/submit.sh CONFIG [section.key=value ...]
#
# CONFIG: a shipped config name (launch/configs/NAME.yaml) or a YAML file. The repository root is
# uploaded as the job's working_dir (runs/, .git/ left out), so a YAML inside the repository is
# found on the cluster; a YAML elsewhere must exist at the same absolute path on the head node.
# The driver joins the cluster: `cluster.address=auto cluster.num_cpus=null` are appended.
#
# Environment (all optional):
#   MINILLM_HEAD=127.0.0.1           the head node's address
#   MINILLM_DASHBOARD_PORT=8265      its job API port
#   MINILLM_SUBMIT_ARGS              extra `ray job submit` flags (e.g. --no-wait), split on spaces
#   MINILLM_DRY_RUN=0                1: print the command instead of running it
#   RAY_AUTH_MODE=token              token (default; same token on every machine) or disabled (everywhere)
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}
if [[ $# -lt 1 ]]; then
    echo "submit.sh: missing CONFIG" >&2
    usage 2
fi
case "$1" in
    -h|--help) usage 0 ;;
    -*|"") echo "submit.sh: CONFIG must be a config name or a YAML file, got '$1'" >&2; usage 2 ;;
esac
config="$1"
shift
for ov in "$@"; do
    if [[ "$ov" != *=* ]]; then
        echo "submit.sh: override '$ov' must look like section.key=value" >&2
        usage 2
    fi
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -f "$config" ]]; then
    abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
    if [[ "$abs" == "$repo_root"/* ]]; then
        config="${abs#"$repo_root"/}"       # relative to the uploaded working_dir
    else
        config="$abs"
        echo "submit.sh: $config is outside the repository: it must exist at this path on the head node" >&2
    fi
elif [[ ! -f "$repo_root/launch/configs/$config.yaml" ]]; then
    echo "submit.sh: '$config' is neither a YAML file nor a shipped config (launch/configs/*.yaml)" >&2
    usage 2
fi

# Ray 2.60 token authentication: head, workers and submitters must run in one mode (another is refused).
# token (the default here): the same token on every machine, from a shared ~/.ray/auth_token or
# `export RAY_AUTH_TOKEN=<the head's \`ray get-auth-token\`>`; RAY_AUTH_MODE=disabled everywhere on a trusted network.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

address="http://${MINILLM_HEAD:-127.0.0.1}:${MINILLM_DASHBOARD_PORT:-8265}"
# VLLM_USE_FLASHINFER_SAMPLER=0 matches the docker image; HF_HUB_OFFLINE=1 so no node downloads.
runtime_env='{"working_dir": ".", "excludes": ["runs/", ".git/", "**/__pycache__/"],
 "env_vars": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}'
cmd=(ray job submit --address "$address" --runtime-env-json "$runtime_env")
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
[[ -n "${MINILLM_SUBMIT_ARGS:-}" ]] && cmd+=(${MINILLM_SUBMIT_ARGS})
cmd+=(-- minillm train --config "$config" --no-progress "$@" cluster.address=auto cluster.num_cpus=null)

cd "$repo_root"
if [[ "${MINILLM_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
