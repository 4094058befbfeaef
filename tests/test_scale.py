"""The scaling properties of benchmarks/scale.py, at a small scale and in seconds.

* ``bilm prepare``'s peak memory does not grow with the corpus (same vocabulary, 4x the text);
  a variant that keeps the corpus in memory is caught by the same measurement;
* the reader's first batch encodes one shard, not all of them;
* evaluate and export hold one copy of the weights (mapped from the checkpoint; the optimizer
  state is never read), and dump-token-embeddings' memory does not grow with the vocabulary.

Memory is measured with ``tracemalloc``: Python objects and numpy arrays (numpy reports its
buffers to it), i.e. the text, lines, counts and id arrays that would grow with a corpus held
in memory; torch's tensors are not traced.
"""
import functools
import os
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from bilm.data import shards as bilm_shards
from bilm.data import LMDataset
from bilm.core.vocab import Vocabulary
from data_tools import inputs as data_inputs
from data_tools import prepare as data_prepare
from data_tools import shuffle as data_shuffle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from corpus import write_corpus  # noqa: E402  (benchmarks/corpus.py, the generator of scale.py)

BASE_TOKENS = 400_000  # the 1x corpus: about 2 MB, a few 1 MB shuffle buckets
VOCAB = 1003  # 1000 words (+3 specials), every one seen in the 1x corpus already


def _corpus(directory, tokens):
    return write_corpus(str(directory), tokens, VOCAB, n_files=4, seed=1, tail_fraction=0.0, log=None)


def _traced_peak(function, *args) -> int:
    """Peak traced bytes above what was allocated before the call."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        function(*args)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _prepare(corpus_dir, out):
    status = data_prepare.main([os.path.join(str(corpus_dir), "news.en-*"), "--out", str(out), "--workers", "1",
                                "--bucket-mb", "1", "--shard-lines", "2000", "--no-progress"])
    assert status == 0


def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    # Read 64 KB blocks instead of 8 MB ones, so that at this small scale every buffer of
    # prepare (a block, a 1 MB bucket, the token counts of 1000 words) is already at its
    # full size in the 1x corpus: from then on only the number of them grows.
    monkeypatch.setattr(data_prepare, "read_blocks", functools.partial(data_inputs.read_blocks, block_bytes=64 << 10))
    small, large = _corpus(tmp_path / "c1", BASE_TOKENS), _corpus(tmp_path / "c4", 4 * BASE_TOKENS)
    assert large["bytes"] > 3.5 * small["bytes"]
    peak_1x = _traced_peak(_prepare, tmp_path / "c1", tmp_path / "p1")
    peak_4x = _traced_peak(_prepare, tmp_path / "c4", tmp_path / "p4")

    # An implementation that held the corpus (its lines) in memory would grow by at least the
    # 3x corpus bytes added (and in fact by several times that, as Python strings); one whose
    # buffers are bounded grows by no more than noise. The bound sits at a third of the former.
    bound = small["bytes"]
    assert peak_4x - peak_1x < bound, (peak_1x, peak_4x, bound)

    # The measurement does see such growth: keep every written line alive (as an in-memory
    # shuffle would) and the same comparison fails by a wide margin.
    kept = []
    write = data_shuffle.ShardWriter.write

    def keeping_write(self, lines):
        kept.append(lines)
        write(self, lines)

    monkeypatch.setattr(data_shuffle.ShardWriter, "write", keeping_write)
    peak_buffering = _traced_peak(_prepare, tmp_path / "c4", tmp_path / "p4b")
    kept.clear()
    assert peak_buffering - peak_1x > 2 * bound, (peak_1x, peak_buffering, bound)


def test_first_batch_encodes_one_shard_not_all(tmp_path, monkeypatch):
    n_shards = 40
    record = write_corpus(str(tmp_path), 40 * 3000, 2003, n_files=n_shards, seed=2, log=None)
    encoded = []
    encode_shard = bilm_shards.encode_shard

    def counting(path, *args, **kwargs):
        encoded.append(path)
        return encode_shard(path, *args, **kwargs)

    monkeypatch.setattr(bilm_shards, "encode_shard", counting)  # what the shard cache calls
    vocab = Vocabulary.from_file(os.path.join(str(tmp_path), record["vocab"]))
    for mode in ("train", "eval"):
        encoded.clear()
        dataset = LMDataset(os.path.join(str(tmp_path), "news.en-*"), vocab, 8, 10, mode=mode, seed=0,
                            rank=0, world_size=1, char_inputs=True)
        batches = iter(dataset)
        next(batches)
        assert len(dataset.shards) == n_shards
        # The shard the batch comes from, and at most the next one encoded ahead in the background.
        assert 1 <= len(encoded) <= 2, (mode, len(encoded))
        for _ in range(5):
            next(batches)
        assert len(encoded) <= 2, (mode, len(encoded))
        dataset._live.close()


def _tiny_checkpoint(tmp_path, vocab_size=500):
    from bilm.runs.checkpoint import save_checkpoint
    from bilm.runs.config import config_to_dict, load_config
    from bilm.modules.language_model import LanguageModel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "tiny.yaml"))
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, vocab_size)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.2, initial_accumulator_value=1.0)
    vocab = ["<S>", "</S>", "<UNK>"] + [f"w{i}" for i in range(vocab_size - 3)]
    path = str(tmp_path / "checkpoints" / "step-00000001.pt")
    save_checkpoint({"step": 1, "config": config_to_dict(cfg), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "vocab": vocab}, path)
    return path, model


def _mapped_file(address: int):
    """The file mapped at ``address`` in this process (None: anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_evaluate_and_export_hold_one_mapped_copy_of_the_weights(tmp_path):
    from bilm.runs.trained_model import model_from_checkpoint

    path, original = _tiny_checkpoint(tmp_path)
    model = model_from_checkpoint(str(tmp_path)).model
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        torch.testing.assert_close(tensor, original.state_dict()[name], rtol=0, atol=0)
    # The softmax (V x dim: 1.6 GB for 800k words) is the checkpoint file's pages, not a copy.
    assert _mapped_file(model.softmax.weight.data_ptr()) == os.path.realpath(path)
    hidden = torch.randn(7, model.softmax.dim)
    targets = torch.randint(0, model.softmax.vocab_size, (7,))
    torch.testing.assert_close(model.softmax.full_loss(hidden, targets)[0],
                               original.softmax.full_loss(hidden, targets)[0])


def test_dump_token_embeddings_memory_does_not_grow_with_the_vocabulary(tmp_path):
    import h5py
    from bilm.inference.embedder import dump_token_embeddings
    from conftest import OPTIONS, WEIGHTS

    def dump(n):
        vocab = tmp_path / f"vocab-{n}.txt"
        vocab.write_text("".join(f"tok{i:07d}\n" for i in range(n)))
        out = str(tmp_path / f"tokens-{n}.hdf5")
        return _traced_peak(dump_token_embeddings, str(vocab), OPTIONS, WEIGHTS, out, 512, "cpu", False), out

    peak_small, _ = dump(2_000)
    peak_large, out = dump(12_000)
    with h5py.File(out) as f:
        table = f["embedding"][...]
        assert table.shape == (12_000, 16) and np.isfinite(table).all()
    # The vocabulary's tokens cost about 58 bytes a token (measured: 0.58 MB for 10,000 more); the
    # vectors held for every token (64 bytes here: the old all-in-memory table) or cached char ids
    # (200 bytes and more) would take it past 100.
    assert peak_large - peak_small < 100 * 10_000, (peak_small, peak_large)
