#!/usr/bin/env bash
# Engine benchmark at batch 32, another commit (BASE) against this tree, alternating processes:
#   benchmarks/engine_ab.sh BASE_COMMIT DICTIONARY [ROUNDS]
# BASE is checked out in a temporary worktree; both sides use this tree's .venv and the same
# dictionary (one whose manifest has the real model fingerprint, e.g. from
# benchmarks.engine.random_dictionary). Prints each process's rows; nothing is appended.
set -euo pipefail
base=$1 dictionary=$(realpath "$2") rounds=${3:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
git -C "$here" worktree add -q --detach "$tree" "$base"
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
args="--batches 32 --configs 8 --rounds 2 --max-tokens 32 --no-append --dictionary $dictionary"
for round in $(seq "$rounds"); do
  for dir in "$tree" "$here"; do
    echo "=== round $round $( [ "$dir" = "$here" ] && echo this || echo "$base") $(date +%T)"
    (cd "$dir" && PYTHONPATH="$dir" HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 \
      "$here/.venv/bin/python" -m benchmarks.engine $args 2>/dev/null | grep -E '^\| 32|screen' \
      | awk '!seen[$0]++')
  done
done
