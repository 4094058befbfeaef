#!/usr/bin/env bash
# Train through DeepSpeed (ZeRO stage 1/2, bf16) on one node; same model and data as DDP.
#
#   NPROC=8 DS_CONFIG=configs/deepspeed/zero2_bf16.json CONFIG=configs/elmo_original.yaml \
#       DATA=corpus/manifest.json OUT=runs/elmo-ds bash launch/train_deepspeed.sh [extra flags]
#
# DS_CONFIG  DeepSpeed JSON (batch sizes are filled in by bilm)  default configs/deepspeed/zero1_bf16.json
# NPROC, CONFIG, DATA, OUT as in train_single_node.sh
set -euo pipefail
: "${DATA:?set DATA=path/to/manifest.json}" "${OUT:?set OUT=run directory}"
CONFIG=${CONFIG:-configs/elmo_original.yaml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero1_bf16.json}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --standalone --nproc-per-node "$NPROC" -m bilm.cli train \
    --config "$CONFIG" --data "$DATA" --out "$OUT" \
    --strategy deepspeed --set train.deepspeed_config="$DS_CONFIG" "$@"
