import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from bilm.core.errors import InputError
from bilm.core.chars import token_to_char_ids
from bilm.data import MANIFEST_FORMAT, MANIFEST_VERSION, LMDataset, encode_shard, load_manifest, write_manifest
from bilm.data.order import SentenceStream
from bilm.data.packing import Packed, Packer, RowPacker, SentencePacker
from bilm.data.shards import ShardCache, rank_plan
from bilm.core.vocab import Vocabulary

BOS, EOS = 0, 1
C = 8  # max_characters_per_token in most tests: small arrays, same code paths


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny(tmp_path):
    """The hand-worked corpus: <S>=0 </S>=1 <UNK>=2 a=3 b=4 c=5 d=6 e=7; 'zz' is OOV."""
    vocab = write(tmp_path / "vocab.txt", "<S>\n</S>\n<UNK>\na\nb\nc\nd\ne\n")
    shard = write(tmp_path / "shard-0.txt", "a b c\nd\n\ne a\nzz\n")  # the blank line is no sentence
    return shard, vocab


def arrays(batch, direction):
    d = batch[direction]
    return d["token_ids"].tolist(), d["next_token_ids"].tolist(), d["mask"].tolist()


def test_packing_matches_hand_worked_example(tiny):
    """bilm-tf's rule (training): a row that runs out takes the next sentence of the stream."""
    shard, vocab = tiny
    stream = iter(LMDataset(shard, vocab, batch_size=2, unroll_steps=3, mode="train", shuffle=False,
                            max_characters_per_token=C))
    batches = [next(stream) for _ in range(2)]
    T = True
    # Forward streams: row 0 = [<S> a b c </S>] [<S> zz </S>], row 1 = [<S> d </S>] [<S> e a </S>]
    # [<S> a ...] (the next epoch); a sentence's last token is only a target; "c" and "e a"
    # continue in batch 1.
    assert arrays(batches[0], "forward") == ([[0, 3, 4], [0, 6, 0]], [[3, 4, 5], [6, 1, 7]], [[T, T, T], [T, T, T]])
    assert arrays(batches[1], "forward") == ([[5, 0, 2], [7, 3, 0]], [[1, 2, 1], [3, 1, 3]], [[T, T, T], [T, T, T]])
    # Backward: each sentence reversed with the boundaries swapped, [</S> c b a <S>] ...
    assert arrays(batches[0], "backward") == ([[1, 5, 4], [1, 6, 1]], [[5, 4, 3], [6, 0, 3]], [[T, T, T], [T, T, T]])
    assert arrays(batches[1], "backward") == ([[3, 1, 2], [3, 7, 1]], [[0, 2, 0], [7, 0, 5]], [[T, T, T], [T, T, T]])
    for batch in batches:
        assert batch["reset_state"].tolist() == [False, False]
        for direction in ("forward", "backward"):
            d = batch[direction]
            assert d["token_ids"].dtype == torch.int64 and d["next_token_ids"].dtype == torch.int64
            assert d["char_ids"].dtype == torch.int32 and d["char_ids"].shape == (2, 3, C)
            assert d["mask"].dtype == torch.bool
    # Char ids come from the text, also for the OOV token.
    chars = batches[1]["forward"]["char_ids"]
    assert chars[0, 2].tolist() == token_to_char_ids("zz", C).tolist()
    assert chars[0, 1].tolist() == token_to_char_ids("<S>", C).tolist()
    assert chars[1, 0].tolist() == token_to_char_ids("e", C).tolist()
    assert batches[0]["backward"]["char_ids"][0, 0].tolist() == token_to_char_ids("</S>", C).tolist()


def test_eval_packing_deals_sentences_round_robin(tiny):
    """Evaluation: row i reads sentences i, i + B, ... (so what precedes a sentence does not
    depend on unroll_steps), and the final partial batches are kept, masked."""
    shard, vocab = tiny
    batches = list(LMDataset(shard, vocab, batch_size=2, unroll_steps=3, mode="eval", max_characters_per_token=C))
    assert len(batches) == 3
    T, F = True, False
    # Forward: row 0 = [<S> a b c </S>] [<S> e a </S>], row 1 = [<S> d </S>] [<S> zz </S>].
    assert arrays(batches[0], "forward") == ([[0, 3, 4], [0, 6, 0]], [[3, 4, 5], [6, 1, 2]], [[T, T, T], [T, T, T]])
    assert arrays(batches[1], "forward") == ([[5, 0, 7], [2, 0, 0]], [[1, 7, 3], [1, 0, 0]], [[T, T, T], [T, F, F]])
    assert arrays(batches[2], "forward") == ([[3, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]], [[T, F, F], [F, F, F]])
    assert arrays(batches[0], "backward") == ([[1, 5, 4], [1, 6, 1]], [[5, 4, 3], [6, 0, 2]], [[T, T, T], [T, T, T]])
    assert arrays(batches[1], "backward") == ([[3, 1, 3], [2, 0, 0]], [[0, 3, 7], [0, 0, 0]], [[T, T, T], [T, F, F]])
    assert arrays(batches[2], "backward") == ([[7, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[T, F, F], [F, F, F]])
    chars = batches[1]["forward"]["char_ids"]
    assert chars[1, 0].tolist() == token_to_char_ids("zz", C).tolist()
    assert (chars[1, 1:] == 0).all()  # masked positions have no characters


def reference_batches(sentences, batch_size, unroll, n_batches):
    """bilm-tf's _get_batch, transcribed (endless sentence stream, ids only)."""
    def stream():
        while True:
            yield from sentences
    source = stream()
    current = [None] * batch_size
    for _ in range(n_batches):
        inputs = np.zeros((batch_size, unroll), np.int64)
        targets = np.zeros((batch_size, unroll), np.int64)
        for i in range(batch_size):
            pos = 0
            while pos < unroll:
                if current[i] is None or len(current[i]) <= 1:
                    current[i] = list(next(source))
                how_many = min(len(current[i]) - 1, unroll - pos)
                inputs[i, pos:pos + how_many] = current[i][:how_many]
                targets[i, pos:pos + how_many] = current[i][1:how_many + 1]
                pos += how_many
                current[i] = current[i][how_many:]
        yield inputs, targets


def make_corpus(tmp_path, n_shards, lines_per_shard, seed=0, vocab_words=40):
    """Shards of random sentences (some blank lines); returns (shard paths, vocab path, sentences)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_words)]
    vocab = write(tmp_path / "vocab.txt", "\n".join(["<S>", "</S>", "<UNK>", *words[:-5]]) + "\n")  # 5 OOV words
    paths, sentences = [], []
    for s in range(n_shards):
        lines = []
        for _ in range(lines_per_shard[s] if isinstance(lines_per_shard, list) else lines_per_shard):
            sentence = [rng.choice(words) for _ in range(rng.randint(1, 12))]
            sentences.append(sentence)
            lines.append(" ".join(sentence))
            if rng.random() < 0.1:
                lines.append("   ")
        paths.append(write(tmp_path / f"shard-{s:03d}.txt", "\n".join(lines) + "\n"))
    return paths, vocab, sentences


@pytest.mark.parametrize("batch_size, unroll", [(1, 1), (2, 3), (3, 7), (5, 20)])
def test_train_packing_equals_bilm_tf_across_epochs(tmp_path, batch_size, unroll):
    paths, vocab_path, sentences = make_corpus(tmp_path, 2, [9, 4])
    vocab = Vocabulary.from_file(vocab_path)
    encoded = [[BOS, *vocab.encode(s).tolist(), EOS] for s in sentences]
    n_batches = 3 * sum(len(s) + 1 for s in sentences) // (batch_size * unroll) + 2  # about three epochs
    dataset = LMDataset(paths, vocab, batch_size, unroll, mode="train", shuffle=False, max_characters_per_token=C)
    ours = iter(dataset)
    known_chars = {tuple(token_to_char_ids(t, C)) for t in vocab.tokens}
    oov_chars = {tuple(token_to_char_ids(w, C)) for s in sentences for w in s if w not in vocab}
    for forward_ref, backward_ref in zip(reference_batches(encoded, batch_size, unroll, n_batches),
                                         reference_batches([s[::-1] for s in encoded], batch_size, unroll, n_batches)):
        batch = next(ours)
        assert batch["forward"]["mask"].all() and batch["backward"]["mask"].all()
        for d in ("forward", "backward"):  # char ids of every position are those of its token
            for token_id, chars in zip(batch[d]["token_ids"].flatten().tolist(),
                                       batch[d]["char_ids"].reshape(-1, C).tolist()):
                if token_id == vocab.unk_id:
                    assert tuple(chars) in oov_chars
                else:
                    assert chars == token_to_char_ids(vocab.tokens[token_id], C).tolist()
        assert known_chars.isdisjoint(oov_chars)
        assert np.array_equal(batch["forward"]["token_ids"].numpy(), forward_ref[0])
        assert np.array_equal(batch["forward"]["next_token_ids"].numpy(), forward_ref[1])
        assert np.array_equal(batch["backward"]["token_ids"].numpy(), backward_ref[0])
        assert np.array_equal(batch["backward"]["next_token_ids"].numpy(), backward_ref[1])
    assert dataset.epoch >= 2


def sentences_read(batches, batch_size):
    """Sentences (tuples of word ids) reconstructed from each row's stream, both directions."""
    found = {"forward": [], "backward": []}
    for direction, start, end in (("forward", BOS, EOS), ("backward", EOS, BOS)):
        for row in range(batch_size):
            inputs = np.concatenate([np.zeros(0, np.int64)] + [
                b[direction]["token_ids"][row][b[direction]["mask"][row]].numpy() for b in batches])
            targets = np.concatenate([np.zeros(0, np.int64)] + [
                b[direction]["next_token_ids"][row][b[direction]["mask"][row]].numpy() for b in batches])
            # the targets are the next inputs, except that a sentence's last target is its end token
            following = inputs[1:].copy()
            following[following == start] = end
            assert np.array_equal(targets[:-1], following)
            assert len(targets) == 0 or targets[-1] == end
            cuts = np.flatnonzero(inputs == start).tolist() + [len(inputs)]
            for a, b in zip(cuts, cuts[1:]):
                words = tuple(inputs[a + 1:b].tolist())
                found[direction].append(words if direction == "forward" else words[::-1])
    return found


@pytest.mark.filterwarnings("ignore:shard")
def test_every_sentence_read_exactly_once_across_ranks(tmp_path):
    """1 to 12 ranks over 3 shards: whole shards per rank, then every R-th line of each shard
    (also more ranks than a shard has lines)."""
    paths, vocab_path, sentences = make_corpus(tmp_path, 3, [11, 6, 8])
    vocab = Vocabulary.from_file(vocab_path)
    expected = Counter(tuple(vocab.encode(s).tolist()) for s in sentences)
    for world_size in range(1, 13):
        found = {"forward": Counter(), "backward": Counter()}
        for rank in range(world_size):
            dataset = LMDataset(paths, vocab, 3, 4, mode="eval", rank=rank, world_size=world_size,
                                max_characters_per_token=C)
            for direction, got in sentences_read(list(dataset), 3).items():
                found[direction].update(got)
        assert found["forward"] == expected, world_size
        assert found["backward"] == expected, world_size


def test_rank_plan_whole_shards_or_strided_lines():
    shards = ["a", "b", "c"]
    assert [(p.path, p.line_offset, p.line_stride) for p in rank_plan(shards, 1, 2)] == [("b", 0, 1)]
    assert [(p.path, p.line_offset, p.line_stride) for p in rank_plan(shards, 0, 2)] == [("a", 0, 1), ("c", 0, 1)]
    assert [(p.path, p.line_offset, p.line_stride) for p in rank_plan(shards, 3, 5)] == [
        ("a", 3, 5), ("b", 3, 5), ("c", 3, 5)]


def test_rank_is_given_not_asked_of_torch_distributed(tiny, monkeypatch):
    shard, vocab = tiny
    # A process group of 2 in which this is rank 1: the dataset must not ask it.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    dataset = LMDataset(shard, vocab, 2, 3)
    assert (dataset.rank, dataset.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        LMDataset(shard, vocab, 2, 3, rank=2, world_size=2)


def test_dataloader_in_process_only(tmp_path):
    """A DataLoader in the training process gives the dataset's batches; worker processes
    would each produce all of them (a row continues in the next batch), so they are refused."""
    paths, vocab_path, _ = make_corpus(tmp_path, 5, 7)
    dataset = LMDataset(paths, vocab_path, 2, 5, mode="eval", max_characters_per_token=C)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0))
    assert len(batches) > 1 and all(batch_equal(x, y) for x, y in zip(batches, dataset, strict=True))
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match=f"cannot be split among {workers} DataLoader workers"):
            list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


def test_eval_predicts_every_token_once_with_final_partial_batch(tmp_path):
    paths, vocab_path, sentences = make_corpus(tmp_path, 2, 13, seed=3)
    dataset = LMDataset(paths, vocab_path, 4, 6, mode="eval", max_characters_per_token=C)
    batches = list(dataset)
    n_predictions = sum(len(s) + 1 for s in sentences)
    for direction in ("forward", "backward"):
        assert [b[direction]["all_valid"] for b in batches] == [bool(b[direction]["mask"].all()) for b in batches]
        assert sum(int(b[direction]["mask"].sum()) for b in batches) == n_predictions
        last = batches[-1][direction]
        assert not last["mask"].all()  # this corpus does not fill the last batch
        masked = ~last["mask"]
        assert (last["token_ids"][masked] == 0).all() and (last["next_token_ids"][masked] == 0).all()
        assert (last["char_ids"][masked] == 0).all()
    again = list(dataset)  # a new pass starts over
    assert len(again) == len(batches) and all(batch_equal(x, y) for x, y in zip(again, batches))


def test_oov_tokens_get_unk_ids_and_char_ids_from_text(tmp_path):
    vocab = write(tmp_path / "vocab.txt", "<S>\n</S>\n<UNK>\nknown\n")
    shard = write(tmp_path / "s.txt", "known unknownword\n")
    batch = next(iter(LMDataset(shard, vocab, 1, 3, mode="eval", max_characters_per_token=20)))
    assert batch["forward"]["token_ids"].tolist() == [[0, 3, 2]]
    assert batch["forward"]["next_token_ids"].tolist() == [[3, 2, 1]]
    assert batch["forward"]["char_ids"][0, 2].tolist() == token_to_char_ids("unknownword", 20).tolist()


def test_train_mode_shuffles_by_seed_and_epoch(tmp_path):
    paths, vocab_path, _ = make_corpus(tmp_path, 4, 10)

    def first(seed, n=30):
        it = iter(LMDataset(paths, vocab_path, 2, 5, seed=seed, max_characters_per_token=C))
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    same = all(torch.equal(x["forward"]["token_ids"], y["forward"]["token_ids"]) for x, y in zip(a, b))
    assert same
    assert not all(torch.equal(x["forward"]["token_ids"], y["forward"]["token_ids"]) for x, y in zip(a, c))
    # forward and backward read in independent orders: the backward stream is not the mirror image
    fwd = [row[row != 0].tolist() for row in a[0]["forward"]["token_ids"]]
    bwd = [row[row != 1].tolist() for row in a[0]["backward"]["token_ids"]]
    assert fwd != bwd


def batch_equal(x, y):
    if x.keys() != y.keys():
        return False
    for key in x:
        if isinstance(x[key], dict):
            if not batch_equal(x[key], y[key]):
                return False
        elif isinstance(x[key], torch.Tensor) or isinstance(y[key], torch.Tensor):
            if not torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])):
                return False
        elif x[key] != y[key]:
            return False
    return True


@pytest.mark.parametrize("mode, per_sentence", [("train", False), ("eval", False), ("train", True), ("eval", True)])
def test_resume_mid_epoch_reproduces_the_remaining_batches(tmp_path, mode, per_sentence):
    paths, vocab_path, _ = make_corpus(tmp_path, 3, [7, 3, 5], seed=5)

    def dataset():
        return LMDataset(paths, vocab_path, 3, 4, mode=mode, per_sentence=per_sentence, seed=11,
                         max_characters_per_token=C, max_cache_bytes=0)  # cache off: reloads too

    it = iter(dataset())
    n_total = 60
    reference = []
    for _ in range(n_total):
        batch = next(it, None)
        if batch is None:
            break
        reference.append(batch)
    for stop in sorted({0, 1, 2, 5, len(reference) // 2, len(reference) - 1, 37} & set(range(len(reference)))):
        first = dataset()
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # plain data, checkpointable
        assert len(json.dumps(state)) < 3000  # positions, not data
        resumed = dataset()
        resumed.load_state_dict(state)
        rest = iter(resumed)
        for expected in reference[stop:]:
            assert batch_equal(next(rest), expected), (stop, mode, per_sentence)
        if mode == "eval":
            assert next(rest, None) is None
    if mode == "train":
        assert first.state_dict()["epoch"] >= 1 and first.epoch >= 1  # the run crossed epochs
    fresh = dataset()
    state = fresh.state_dict()  # before any iteration: the beginning
    resumed = dataset()
    resumed.load_state_dict(state)
    assert all(batch_equal(x, y) for x, y in zip(resumed, reference[:10]))


def test_state_of_another_configuration_is_refused(tmp_path):
    paths, vocab_path, _ = make_corpus(tmp_path, 2, 5)
    dataset = LMDataset(paths, vocab_path, 2, 4, max_characters_per_token=C)
    it = iter(dataset)
    next(it)
    state = dataset.state_dict()
    other = LMDataset(paths, vocab_path, 3, 4, max_characters_per_token=C)
    with pytest.raises(ValueError, match="config.batch_size"):
        other.load_state_dict(state)


def test_per_sentence_rows_hold_one_sentence_and_do_not_depend_on_shape(tmp_path):
    paths, vocab_path, sentences = make_corpus(tmp_path, 2, [6, 5], seed=2)
    vocab = Vocabulary.from_file(vocab_path)
    expected = [vocab.encode(s).tolist() + [EOS] for s in sentences]  # forward targets of each sentence

    def targets_per_sentence(batch_size, unroll):
        dataset = LMDataset(paths, vocab, batch_size, unroll, mode="eval", per_sentence=True,
                            max_characters_per_token=C)
        out, group = [], None
        for batch in dataset:
            if batch["reset_state"].all():
                out.extend([group] if group else [])
                group = {"forward": [[] for _ in range(batch_size)], "backward": [[] for _ in range(batch_size)]}
            else:
                assert not batch["reset_state"].any()
            for direction, start in (("forward", BOS), ("backward", EOS)):
                d = batch[direction]
                for row in range(batch_size):
                    group[direction][row] += d["next_token_ids"][row][d["mask"][row]].tolist()
                    if batch["reset_state"][row] and d["mask"][row, 0]:
                        assert d["token_ids"][row, 0] == start  # a group starts at its sentences' starts
        out.extend([group] if group else [])
        return out

    for batch_size, unroll in [(1, 50), (3, 4), (4, 1), (7, 5)]:
        groups = targets_per_sentence(batch_size, unroll)
        forward = [row for g in groups for row in g["forward"] if row]
        backward = [row for g in groups for row in g["backward"] if row]
        assert forward == expected
        # the same sentence, reversed, in the same row of the backward batch
        assert backward == [vocab.encode(s[::-1]).tolist() + [BOS] for s in sentences]


def test_manifest_source_and_split(tmp_path):
    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "heldout")
    write(tmp_path / "train" / "shard-00000.txt", "a b\nb c\n")
    write(tmp_path / "heldout" / "shard-00000.txt", "c a b\n")
    write(tmp_path / "vocab.txt", "<S>\n</S>\n<UNK>\na\nb\nc\n")
    manifest = {"train": {"shards": ["train/shard-00000.txt"]}, "heldout": {"shards": ["heldout/shard-00000.txt"]},
                "vocab": "vocab.txt", "n_train_tokens": 4}
    write(tmp_path / "manifest.json", json.dumps(manifest))
    loaded = load_manifest(str(tmp_path / "manifest.json"))
    assert loaded["train"]["shards"] == [str(tmp_path / "train" / "shard-00000.txt")]
    assert loaded["vocab"] == str(tmp_path / "vocab.txt")
    evaluation = LMDataset(str(tmp_path / "manifest.json"), None, 1, 10, mode="eval", max_characters_per_token=C)
    assert int(next(iter(evaluation))["forward"]["mask"].sum()) == 4  # the heldout sentence
    train_split = LMDataset(str(tmp_path / "manifest.json"), None, 1, 10, mode="eval", split="train",
                            max_characters_per_token=C)
    assert int(next(iter(train_split))["forward"]["mask"].sum()) == 6
    write(tmp_path / "broken.json", json.dumps({"train": {"shards": "x"}, "heldout": {"shards": []}}))
    with pytest.raises(ValueError, match="train.shards"):
        load_manifest(str(tmp_path / "broken.json"))


def test_manifest_written_with_its_format_version_and_read_back(tmp_path):
    written = write_manifest(tmp_path / "manifest.json", {"train": {"shards": ["t.txt"]},
                                                          "heldout": {"shards": []}, "vocab": "vocab.txt"})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == written
    assert list(on_disk)[:2] == ["format", "format_version"]
    assert (on_disk["format"], on_disk["format_version"]) == (MANIFEST_FORMAT, MANIFEST_VERSION)
    assert not os.path.exists(tmp_path / "manifest.json.tmp")
    loaded = load_manifest(tmp_path / "manifest.json")
    assert loaded["train"]["shards"] == [str(tmp_path / "t.txt")] and loaded["format_version"] == MANIFEST_VERSION


def test_manifest_without_a_version_is_read_as_version_1(tmp_path):
    write(tmp_path / "manifest.json", json.dumps({"train": {"shards": ["t.txt"]}, "heldout": {"shards": []}}))
    assert load_manifest(tmp_path / "manifest.json")["train"]["shards"] == [str(tmp_path / "t.txt")]


@pytest.mark.parametrize("value", ["abc", -1, 2.5, True])
def test_manifest_counts_must_be_counts(tmp_path, value):
    """train divides by n_train_tokens: a hand-edited manifest's string would be a TypeError deep inside."""
    write(tmp_path / "manifest.json", json.dumps({"train": {"shards": ["t.txt"]}, "heldout": {"shards": []},
                                                  "n_train_tokens": value}))
    with pytest.raises(InputError, match=re.escape(f"manifest.json: key 'n_train_tokens' must be a count (an integer "
                                                   f">= 0), got {value!r}")):
        load_manifest(tmp_path / "manifest.json")


def test_manifest_from_a_newer_version_is_refused(tmp_path, tiny):
    shard, vocab = tiny
    newer = MANIFEST_VERSION + 1
    path = write(tmp_path / "manifest.json", json.dumps({"format": MANIFEST_FORMAT, "format_version": newer,
                                                         "train": {"shards": [shard]}, "heldout": {"shards": [shard]},
                                                         "vocab": vocab}))
    message = f"manifest.json: format version {newer} is newer than this bilm reads ({MANIFEST_VERSION}); upgrade bilm"
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_manifest(path)
    assert str(raised.value).startswith(path)  # names the file
    with pytest.raises(ValueError, match="upgrade bilm"):
        LMDataset(path, None, 2, 3)
    write(tmp_path / "bad.json", json.dumps({"format_version": "2", "train": {"shards": []}, "heldout": {"shards": []}}))
    with pytest.raises(ValueError, match="'format_version' must be a positive integer, got '2'"):
        load_manifest(tmp_path / "bad.json")


def test_both_packers_share_the_packer_interface(tiny):
    """Training/evaluation row packing and per-sentence packing fill the same Packed layout,
    so batch assembly has one path."""
    shard, vocab = tiny
    vocab = Vocabulary.from_file(vocab)
    plan = rank_plan([shard], 0, 1)
    cache = ShardCache(plan, vocab, C, 1 << 20, char_ids=True)

    def stream(direction):
        return SentenceStream(plan, cache, seed=0, direction=direction, shuffle=False, infinite=False)

    packers = [RowPacker(stream(0), stream(1), cache, 2, 3, round_robin=False),
               RowPacker(stream(0), stream(1), cache, 2, 3, round_robin=True),
               SentencePacker(stream(0), cache, 2, 3)]
    for packer in packers:
        assert isinstance(packer, Packer)
        layouts = list(iter(packer.fill, None))
        assert layouts and all(type(p) is Packed for p in layouts)
        for p in layouts:
            assert isinstance(p.reset_state, bool)
            for segments in (p.forward, p.backward):
                assert all(len(seg) == 5 and all(type(v) is int for v in seg) for seg in segments)
        assert json.loads(json.dumps(packer.state_dict()))  # plain data
        # Rows carry their states over; per sentence, the states reset at each group of 2 sentences:
        # "a b c" + "d" (4 inputs: 2 windows of 3), then "e a" + "zz" (1 window).
        expected = [True, False, True] if isinstance(packer, SentencePacker) else [False] * len(layouts)
        assert [p.reset_state for p in layouts] == expected
    cache.close()


def test_shard_cache_budget_counts_char_tables(tmp_path):
    """With many distinct words, a shard's char table outweighs its ids (a 2.9M-position shard
    of the 1B-Word-like corpus: 382k distinct words, 36 MB of int16 table against 22 MB of ids
    and rows); the budget must count it, or the cache holds several times the memory it was given."""
    words = [f"w{i:05d}" for i in range(400)]  # every word once: a table row per position
    paths = [write(tmp_path / f"s{k}.txt", "\n".join(" ".join(words[j:j + 20]) for j in range(0, 400, 20)) + "\n")
             for k in range(2)]
    vocab = Vocabulary(["<S>", "</S>", "<UNK>"] + words)
    cache = ShardCache(rank_plan(paths, 0, 1), vocab, 50, max_bytes=0, char_ids=True)
    one = cache.get(0)
    ids_bytes = one.token_ids.nbytes + one.char_rows.nbytes
    assert one.char_table.nbytes > 5 * ids_bytes and one.nbytes >= ids_bytes + one.char_table.nbytes
    # A budget of 1.5 shards: ample for two shards' ids, too small for two shards.
    cache = ShardCache(rank_plan(paths, 0, 1), vocab, 50, max_bytes=int(1.5 * one.nbytes), char_ids=True)
    cache.get(0)
    cache.get(1)
    cache.release({1})
    assert cache.nbytes == one.nbytes  # shard 0 dropped, shard 1 (in use) kept
    cache.get(0)
    cache.release({0, 1})
    assert cache.nbytes == 2 * one.nbytes  # shards in use stay whatever the budget
    cache = ShardCache(rank_plan(paths, 0, 1), vocab, 50, max_bytes=2 * one.nbytes, char_ids=True)
    cache.get(0)
    cache.get(1)
    cache.release(set())
    assert cache.nbytes == 2 * one.nbytes  # both fit: neither is encoded again
    cache.close()


def test_glob_matching_nothing_names_the_pattern(tmp_path, tiny):
    _, vocab = tiny
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        LMDataset(pattern, vocab, 2, 3)


def test_empty_shards_are_skipped_with_a_warning(tmp_path, tiny):
    shard, vocab = tiny
    empty = write(tmp_path / "shard-1.txt", "")
    blank = write(tmp_path / "shard-2.txt", "\n  \n")
    with pytest.warns(UserWarning, match="shard-1.txt is empty"):
        dataset = LMDataset([shard, empty, blank], vocab, 2, 3, mode="eval", max_characters_per_token=C)
    with pytest.warns(UserWarning, match="shard-2.txt has no sentences"):
        batches = list(dataset)
    assert sum(int(b["forward"]["mask"].sum()) for b in batches) == 11
    with pytest.warns(UserWarning):
        with pytest.raises(RuntimeError, match="no sentences"):
            next(iter(LMDataset([blank], vocab, 2, 3, mode="train")))


def test_without_char_inputs_there_are_no_char_ids(tiny):
    shard, vocab = tiny
    batch = next(iter(LMDataset(shard, vocab, 2, 3, char_inputs=False)))
    assert "char_ids" not in batch["forward"] and "char_ids" not in batch["backward"]


def test_encode_shard_strided_lines(tiny):
    shard, vocab = tiny
    vocab = Vocabulary.from_file(vocab)
    whole = encode_shard(shard, vocab, C)
    assert whole.n_sentences == 4 and whole.starts == [0, 5, 8, 12, 15]
    odd = encode_shard(shard, vocab, C, line_offset=1, line_stride=2)  # file lines 1 and 3: "d", "e a"
    assert odd.token_ids.tolist() == [0, 6, 1, 0, 7, 3, 1]


def test_a_shard_named_twice_is_read_once(tiny):
    shard, vocab = tiny
    dataset = LMDataset([shard, os.path.join(os.path.dirname(shard), "shard-*")], vocab, 2, 3)
    assert dataset.shards == [shard]
