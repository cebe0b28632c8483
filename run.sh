#!/usr/bin/env bash
# Quick start: creates .venv/ on first use (fast afterwards), then runs one job.
#   ./run.sh demo        the whole method on the embedded synthetic domain pair (no data, weights or network)
#   ./run.sh test        the test suite
#   ./run.sh <args...>   any dualref command, e.g. ./run.sh data check ../shared/data/Market-1501 --dataset market1501
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp=$venv/.dualref-installed
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch/torchvision are pinned to releases pip finds on local disk here; the ranges in pyproject.toml
    # accept any release from 2.2 on.
    "$venv/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$venv/bin/pip" install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
[ $# -gt 0 ] || set -- demo
cmd=$1
case "$cmd" in
    test)
        shift
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    lint)
        "$venv/bin/ruff" check src tests benchmarks
        exec "$venv/bin/mypy"
        ;;
    *)
        exec "$venv/bin/dualref" "$@"
        ;;
esac
