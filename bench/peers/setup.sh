#!/usr/bin/env bash
# Installs the peers of bench/peers.py (TRL + PEFT on the PyTorch CPU build, transformers'
# generate) into their own virtual environment, beside cpo_jax, never into the runtime install:
#
#   bash bench/peers/setup.sh [VENV]        # default: $PEERS_VENV or ../venv-peers
#   VENV/bin/python bench/peers.py          # ~1.5 min on a quiet 2-core machine; --quick: 2 steps each
#
# The same packages go into an existing environment with `pip install -e '.[bench]'`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-${PEERS_VENV:-$(dirname "$repo")/venv-peers}}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip setuptools wheel >/dev/null
# torch==2.13.0 is pinned in the extra: an unpinned torch resolves to a CUDA build (GBs).
"$venv/bin/python" -m pip install -e "$repo[bench]"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for p in ('torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'jax', 'flax'):
  print(f'{p:14}{md.version(p)}')
import peft, trl  # noqa: E401,F401  (imports cleanly beside this torch)
PY
echo "peers venv ready: $venv"
