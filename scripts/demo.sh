#!/usr/bin/env bash
# Install dinofeat into .venv and run the offline demo end to end: `dinofeat demo`
# pretrains a small ViT with DINO on Fashion-MNIST for a few minutes on the CPU, prints its
# k-NN accuracy next to random weights, and writes neighbours and attention maps as PNGs.
# Arguments go to `dinofeat demo` (e.g. --out DIR, --steps N, --threads 1); see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh ""
source scripts/_fmnist.sh
data="${DINOFEAT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  echo "demo: Fashion-MNIST not found in $data; install it with" >&2
  echo "  apt-get install -y dataset-fashion-mnist" >&2
  echo "or set DINOFEAT_FASHION_MNIST to a folder holding its four IDX .gz files" >&2
  exit 1
fi
exec dinofeat demo "$@"
