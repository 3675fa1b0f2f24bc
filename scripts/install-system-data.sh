#!/usr/bin/env bash
# Installs the Debian package that ships Fashion-MNIST (idx files under /usr/share/datasets/fashion-mnist).
# Where apt is not available the tests that need it skip and `builtin:fashion-mnist` explains what to install.
set -u
target=/usr/share/datasets/fashion-mnist
if [ -d "$target" ] && ls "$target"/*idx* >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: apt-get not found; install Fashion-MNIST yourself (or set VPROMPT_DATA) to use builtin:fashion-mnist" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "note: not root and no sudo; run 'apt-get install dataset-fashion-mnist' as root" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
  || echo "note: could not install dataset-fashion-mnist with apt-get" >&2
exit 0
