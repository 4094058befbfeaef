"""``bilm evaluate``: full-softmax perplexity of the forward LM, the backward LM and their average.

Stateful like training: each batch row carries its LSTM states across batches, every
heldout token is predicted exactly once (the final partial batch is masked, not dropped).
Because rows concatenate sentences, the batch size decides which sentences precede which
and so changes the result slightly; ``per_sentence`` resets the states at every sentence,
making the result independent of batch size and unroll length.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm import tqdm

from bilm.data import LMDataset
from bilm.distributed import all_reduce_sum, init_distributed, shutdown
from bilm.export import model_from_checkpoint
from bilm.model import DIRECTIONS, LanguageModel, reset_state_rows
from bilm.train import to_device
from bilm.vocab import Vocabulary


@torch.no_grad()
def perplexity(model: LanguageModel, dataset: LMDataset, device: torch.device, progress: bool = True) -> dict:
    """Sums over this process's share of ``dataset``: NLL, token and <UNK>-target counts per direction."""
    model.eval()
    unk = dataset.vocab.unk_id
    sums = {f"{d}/{k}": 0.0 for d in DIRECTIONS for k in ("nll", "tokens", "unk")}
    state = None
    for batch in tqdm(dataset, disable=not progress, unit="batch", desc="evaluate"):
        batch = to_device(batch, device)
        state = reset_state_rows(state, batch["reset_state"])
        losses, state = model.evaluate(batch, state)
        for d in DIRECTIONS:
            sums[f"{d}/nll"] += float(losses[d].loss_sum)
            sums[f"{d}/tokens"] += float(losses[d].count)
            b = batch[d]
            sums[f"{d}/unk"] += float(((b["next_token_ids"] == unk) & b["mask"]).sum())
    return sums


def summarize(sums: dict) -> dict:
    out = {}
    for d in DIRECTIONS:
        mean = sums[f"{d}/nll"] / max(sums[f"{d}/tokens"], 1.0)
        out[d] = {"perplexity": math.exp(mean), "mean_loss": mean, "tokens": int(sums[f"{d}/tokens"]),
                  "unk_targets": int(sums[f"{d}/unk"])}
    # bilm-tf reports exp of the mean of the two mean losses.
    out["average_perplexity"] = math.exp(0.5 * (out["forward"]["mean_loss"] + out["backward"]["mean_loss"]))
    return out


def evaluate(checkpoint: str, data: str, batch_size: Optional[int] = None, unroll_steps: Optional[int] = None,
             per_sentence: bool = False, device: str = "auto", progress: bool = True) -> dict:
    env = init_distributed(device)
    try:
        model, cfg, vocab_tokens, found = model_from_checkpoint(checkpoint)
        model.to(env.device)
        char_cnn = cfg.model.char_cnn
        dataset = LMDataset(data, Vocabulary(vocab_tokens, source=found), batch_size or cfg.train.batch_size,
                            unroll_steps or cfg.train.unroll_steps, mode="eval", per_sentence=per_sentence,
                            rank=env.rank, world_size=env.world_size, char_inputs=char_cnn is not None,
                            max_characters_per_token=char_cnn.max_characters_per_token if char_cnn else 50)
        sums = perplexity(model, dataset, env.device, progress and env.is_main)
        keys = sorted(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], env)))
        result = summarize(totals)
        result.update(checkpoint=found, data=data, batch_size=dataset.batch_size, unroll_steps=dataset.unroll_steps,
                      per_sentence=per_sentence, world_size=env.world_size)
        return result
    finally:
        shutdown()
