#!/usr/bin/env bash
# Install dinofeat with its test extra into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "test,onnx,docs"  # onnx: export tests; docs: the mkdocs --strict build test
source scripts/_fmnist.sh  # tests that need Fashion-MNIST skip without it
exec python -m pytest "$@"
