"""Whether a run may resume from a checkpoint: the model, the vocabulary and the text pipeline
must be the checkpoint's; every other setting may change (and the changes are reported)."""
from __future__ import annotations

from typing import Any, Optional

from bilm.runs.checkpoint import CheckpointError
from bilm.runs.config import config_from_dict, config_to_dict

# What a resumed run may not change: the model itself, and what the optimizer state's layout
# follows. Everything else (learning rate, steps, epochs, intervals, evaluation, ...) may change.
FIXED_KEYS = ("model.", "optim.name", "train.sparse_softmax")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    flat: dict[str, Any] = {}
    for key, value in d.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:12]


def check_resume(payload: dict, path: str, config: dict, vocab: list[str], vocab_source: str,
                 text_pipeline: Optional[dict]) -> list[str]:
    """Refuse (``CheckpointError``, one line naming the keys and both values) a resume whose model,
    vocabulary or text pipeline differ from the checkpoint's; returns the other settings that changed
    (``key: old -> new``), which are accepted. ``config`` is ``config_to_dict`` of this run's config;
    ``text_pipeline`` the ``TextPipeline.to_state()`` of this run's data (None: not known)."""
    try:
        saved = _flatten(config_to_dict(config_from_dict(payload["config"], where=f"{path} (its config)")))
    except ValueError as e:
        raise CheckpointError(f"{path}: its config does not read ({e})") from None
    ours = _flatten(config)
    refused, changed = [], []
    for key in sorted(set(saved) | set(ours)):
        old, new = saved.get(key), ours.get(key)
        if old == new:
            continue
        if key.startswith(FIXED_KEYS):
            refused.append(f"{key}: checkpoint {old!r} vs this run {new!r}")
        else:
            changed.append(f"{key}: {old!r} -> {new!r}")
    saved_vocab = payload.get("vocab")
    if saved_vocab is not None and list(saved_vocab) != list(vocab):
        def describe(tokens):
            return f"{len(tokens)} tokens, sha256 {_digest(chr(10).join(tokens).encode('utf-8', 'surrogatepass'))}"
        first = next((i for i, (a, b) in enumerate(zip(saved_vocab, vocab)) if a != b),
                     min(len(saved_vocab), len(vocab)))
        refused.append(f"vocabulary: checkpoint {describe(saved_vocab)} vs {vocab_source} {describe(vocab)} "
                       f"(first difference at line {first + 1})")
    saved_pipeline = payload.get("text_pipeline")
    if isinstance(saved_pipeline, dict) and text_pipeline is not None:
        def pipeline_view(state):
            proto = state.get("sp_model_proto")
            return {"tokenizer": state.get("tokenizer"), "nfkc": bool(state.get("nfkc", False)),
                    "max_tokens_per_line": int(state.get("max_tokens_per_line", 0)),
                    "sentencepiece_model": f"sha256 {_digest(proto)}" if proto else None,
                    # absent before they existed: the behaviour then (no language, no sentence splitting)
                    "lang": state.get("lang") if state.get("tokenizer") == "moses" or state.get("split_sentences")
                    else None, "split_sentences": state.get("split_sentences")}
        a, b = pipeline_view(saved_pipeline), pipeline_view(text_pipeline)
        refused += [f"text_pipeline.{k}: checkpoint {a[k]!r} vs this run {b[k]!r}" for k in a if a[k] != b[k]]
    if refused:
        raise CheckpointError(f"{path}: cannot resume a different model: {'; '.join(refused)}; resume with the "
                              "checkpoint's model, vocabulary and tokenizer, or train into another --out")
    return changed
