#!/usr/bin/env bash
# Install dinofeat into .venv and run the offline demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec python examples/quickstart.py "$@"
