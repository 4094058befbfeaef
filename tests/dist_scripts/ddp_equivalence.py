"""Run under torchrun (or alone): N training steps on a fixed global batch; write the parameters.

Each of R ranks takes its share of the rows of one fixed global batch, so R ranks together
see exactly the batch a single process sees.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bilm.data import LMDataset  # noqa: E402
from bilm.core.distributed import init_distributed, shutdown  # noqa: E402
from bilm.training.step import TrainStep  # noqa: E402
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config  # noqa: E402

GLOBAL_ROWS, STEPS = 4, 4


def global_batches():
    data = LMDataset(TRAIN_DATA, TRAIN_VOCAB, GLOBAL_ROWS, 10, mode="train", seed=0, rank=0, world_size=1)
    it = iter(data)
    return [next(it) for _ in range(STEPS)]


def rows(batch, start, stop):
    if isinstance(batch, dict):
        return {k: rows(v, start, stop) for k, v in batch.items()}
    return batch[start:stop] if isinstance(batch, torch.Tensor) else batch


def main(out_path, strategy="ddp"):
    overrides = ["train.dropout=0.0", "train.same_negative_samples_across_ranks=true", f"train.strategy={strategy}"]
    if strategy == "deepspeed":
        overrides.append(f"train.deepspeed_config={os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'deepspeed', 'zero1.json')}")
        overrides.append("train.sparse_softmax=false")
    cfg = tiny_config(*overrides)
    env = init_distributed("cpu")
    share = GLOBAL_ROWS // env.world_size
    trainer = TrainStep(cfg, 32, env)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    losses = []
    for batch in global_batches():
        losses.append(float(trainer.step(rows(batch, env.rank * share, (env.rank + 1) * share)).loss))
    if env.is_main:
        torch.save({"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                    "initial": initial, "losses": losses}, out_path)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
