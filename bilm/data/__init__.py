"""Training and evaluation batches for the biLM: a streaming, sharded, resumable reader.

``LMDataset`` reads shards (whitespace-tokenized text, one sentence per line: what
``bilm prepare`` writes) and yields batches packed exactly as bilm-tf's ``_get_batch``: each
of the ``batch_size`` rows is a stream of sentences ``<S> w1 .. wn </S>`` (reversed,
``</S> wn .. w1 <S>``, for the backward LM); a batch is the next ``unroll_steps`` inputs of
every row, the targets are the next tokens, and a sentence cut by the end of a batch continues
in the same row of the next batch. The modules, by job: ``manifest`` (the corpus manifest,
written by ``bilm prepare`` and read here), ``shards`` (finding, splitting among ranks,
encoding and caching shards), ``order`` (the order sentences are read in), ``packing`` (where
sentences go in a batch) and ``dataset`` (``LMDataset``: tensors and resumable state).

``LMDataset`` and ``STATE_VERSION`` are imported on first use: they need torch, which
``bilm prepare`` (a user of ``bilm.data.manifest``) does not load.
"""
from bilm.data.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, load_manifest, write_manifest
from bilm.data.shards import EncodedShard, encode_shard, resolve_shards

__all__ = ["EncodedShard", "LMDataset", "MANIFEST_FORMAT", "MANIFEST_VERSION", "STATE_VERSION", "encode_shard",
           "load_manifest", "resolve_shards", "write_manifest"]


def __getattr__(name):
    if name in ("LMDataset", "STATE_VERSION"):
        from bilm.data import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module 'bilm.data' has no attribute {name!r}")
