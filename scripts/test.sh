#!/usr/bin/env bash
# Install dinofeat with its test extra into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "test,onnx,docs"  # onnx: export tests; docs: the mkdocs --strict build test
if ! [ -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
   || echo "note: dataset-fashion-mnist not installed; tests that need it will skip"
fi
exec python -m pytest "$@"
