#!/usr/bin/env bash
# Train through DeepSpeed (ZeRO stage 1/2) on one node; same model and data as DDP.
#
#   NPROC=8 DS_CONFIG=configs/deepspeed/zero2.json CONFIG=configs/elmo_original.yaml \
#       DATA=corpus/manifest.json OUT=runs/elmo-ds bash launch/train_deepspeed.sh [extra flags]
#
# DS_CONFIG  DeepSpeed JSON: ZeRO settings only (batch sizes, optimizer, clipping and precision
#            come from the bilm config; a JSON that sets them is rejected)   default configs/deepspeed/zero1.json
# PRECISION  bf16 or fp32: overrides the config's train.precision (default: the config's own)
# NPROC, CONFIG, DATA, OUT as in train_single_node.sh
# ZeRO partitions dense gradients, so the softmax gradient is dense here (train.sparse_softmax=false).
set -euo pipefail
: "${DATA:?set DATA=path/to/manifest.json}" "${OUT:?set OUT=run directory}"
CONFIG=${CONFIG:-configs/elmo_original.yaml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero1.json}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --standalone --nproc-per-node "$NPROC" -m bilm.cli train \
    --config "$CONFIG" --data "$DATA" --out "$OUT" \
    --strategy deepspeed --set train.deepspeed_config="$DS_CONFIG" \
    --set train.sparse_softmax=false ${PRECISION:+--set train.precision="$PRECISION"} "$@"
