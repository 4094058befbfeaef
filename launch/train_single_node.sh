#!/usr/bin/env bash
# Train on all GPUs of one machine: one process per GPU, DDP over NCCL (gloo on CPU).
#
#   NPROC=8 CONFIG=configs/elmo_original.yaml DATA=corpus/manifest.json OUT=runs/elmo \
#       bash launch/train_single_node.sh [extra bilm train flags, e.g. --resume --set train.batch_size=64]
#
# NPROC   processes (GPUs) on this node       default: all visible GPUs, else 1
# CONFIG  training config                     default: configs/elmo_original.yaml
# DATA    manifest.json from `bilm prepare`   required
# OUT     run directory                       required
set -euo pipefail
: "${DATA:?set DATA=path/to/manifest.json}" "${OUT:?set OUT=run directory}"
CONFIG=${CONFIG:-configs/elmo_original.yaml}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --standalone --nproc-per-node "$NPROC" -m bilm.cli train \
    --config "$CONFIG" --data "$DATA" --out "$OUT" "$@"
