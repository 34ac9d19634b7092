#!/usr/bin/env bash
# Install dinofeat with its test extra into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "test,onnx,docs,serve,serve-test"  # onnx: export tests; docs: the mkdocs --strict build test; serve: dinofeat serve
# the browser tests of dinofeat serve drive Debian's chromium (never a downloaded browser)
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q chromium chromium-driver \
    || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null \
    || echo "could not install chromium: the browser tests will skip" >&2
fi
source scripts/_fmnist.sh  # tests that need Fashion-MNIST skip without it
exec python -m pytest "$@"
