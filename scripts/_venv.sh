# Sourced by the other scripts: make (or reuse) a virtual environment with dinofeat
# installed from this checkout, pinned by constraints.txt. $DINOFEAT_VENV picks the folder
# (default .venv); $1 is the pip extra to install ("" or "test").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DINOFEAT_VENV:-$here/.venv}"
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
spec="$here"
[ -n "$extra" ] && spec="$here[$extra]"
# Quiet when everything is already there; torch + torchvision take about a minute otherwise.
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$here/constraints.txt" -e "$spec" 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" || true
"$venv/bin/python" -c "import torch, torchvision, timm, faiss" \
  || { echo "dinofeat: the environment in $venv is broken (torch/torchvision mismatch?)" >&2; exit 1; }
export PATH="$venv/bin:$PATH"
