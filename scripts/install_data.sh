#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian package dataset-fashion-mnist) when it is missing.
set -euo pipefail
DIR="${CHANNELPRUNE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]; then
  exit 0
fi
echo "Fashion-MNIST not found in $DIR; installing the Debian package dataset-fashion-mnist..."
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get is not available. Install Fashion-MNIST's idx files yourself and point" >&2
  echo "       CHANNELPRUNE_FASHION_MNIST_DIR at the directory that holds train-images-idx3-ubyte.gz." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "error: installing dataset-fashion-mnist needs root. Run: sudo apt-get install -y dataset-fashion-mnist" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
