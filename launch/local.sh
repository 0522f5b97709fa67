#!/usr/bin/env bash
# One machine, every local accelerator (or the CPU): a single process sees all devices.
#   bash launch/local.sh configs/magface.py:demo runs/magface_demo [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
exec python -m magjax.main --config "$config" --workdir "$workdir" "$@"
