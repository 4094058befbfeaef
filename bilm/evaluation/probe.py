"""``bilm probe``: a frozen biLM, a small head trained on its vectors per layer setting and seed,
the test score with its spread.

The labelled data is read once (``Task``): the training file (optionally a fixed subsample), a dev
split carved from it (a stated fraction drawn with a fixed seed: it chooses the epoch, early
stopping with ``patience``; the test file never does), the test file. The vectors of each model
and file come from one embedding pass, cached (``bilm.evaluation.vectors``), so settings, seeds and
heads cost no second pass. Each (setting, seed) trains a fresh head with Adam; runs with the same
seed give the same scores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bilm.core.errors import InputError
from bilm.core.progress import progress_bar
from bilm.evaluation.heads import ProbeNet, Setting, build_net, select_layers
from bilm.evaluation.metrics import accuracy, is_bio, span_f1
from bilm.evaluation.probe_data import LabelledData, dev_split, read_task_file, subsample, unseen_labels
from bilm.evaluation.vectors import ProbedModel, Vectors, file_vectors

BATCH_SENTENCES = 32  # sentences a step: classification, and tagging with the cnn head
BATCH_TOKENS = 128    # tokens a step: tagging with the linear and mlp heads
IGNORE = -100         # padding positions in a loss


@dataclass
class ProbeConfig:
    task: str                       # classify or tag
    head: str = "linear"
    seeds: int = 3
    epochs: int = 40                # at most; early stopping on the dev split usually ends sooner
    patience: int = 3               # epochs without a better dev score before stopping
    lr: float = 1e-3
    dev_fraction: float = 0.1
    split_seed: int = 0             # draws the dev split and the --max-train subsample
    max_train: Optional[int] = None
    tag_column: Optional[int] = None
    label_column: Optional[int] = None  # classify: the label's and the text's columns (default label<TAB>text)
    text_column: Optional[int] = None

    def check(self) -> None:
        if self.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {self.seeds}")
        if self.epochs < 1 or self.patience < 1:
            raise InputError("--epochs and --patience must be at least 1")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.max_train is not None and self.max_train < 2:
            raise InputError(f"--max-train must be at least 2, got {self.max_train}")


class Task:
    """The labelled data of one probe: train (a subsample, if asked), its dev split, and test."""

    def __init__(self, train_path: str, test_path: str, config: ProbeConfig, dev_path: Optional[str] = None):
        config.check()
        self.config = config
        columns = (config.tag_column, config.label_column, config.text_column)
        full = read_task_file(train_path, config.task, *columns)
        self.train_file_size = len(full)
        self.train_all = subsample(full, config.max_train, config.split_seed)
        self.test = read_task_file(test_path, config.task, *columns, training=False)
        if dev_path is not None:
            self.dev_file: Optional[LabelledData] = read_task_file(dev_path, config.task, *columns, training=False)
            self.train_ids = np.arange(len(self.train_all))
            self.dev_ids = None
        else:
            self.dev_file = None
            self.train_ids, self.dev_ids = dev_split(self.train_all, config.dev_fraction, config.split_seed)
        self.labels = self.train_all.label_set()
        if len(self.labels) < 2:
            raise InputError(f"{train_path}: one {'label' if config.task == 'classify' else 'tag'} only "
                             f"({self.labels[0]!r}); a probe needs at least two")
        self.label_id = {label: i for i, label in enumerate(self.labels)}
        self.bio = config.task == "tag" and is_bio(self.labels)
        self.metric = "f1" if self.bio else "accuracy"
        files = [full, self.test] + ([self.dev_file] if self.dev_file is not None else [])
        self.warnings = [f"{data.path}, line {data.header_line}: read as a header and skipped" for data in files
                         if data.header_line is not None]
        self.warnings += [w for w in (unseen_labels(self.test, self.labels, train_path),
                                      self.dev_file and unseen_labels(self.dev_file, self.labels, train_path)) if w]

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def n_dev(self) -> int:
        return len(self.dev_file) if self.dev_file is not None else len(self.dev_ids)

    def describe(self) -> dict:
        c = self.config
        return {"train": self.train_all.path, "test": self.test.path,
                "train_file_examples": self.train_file_size,
                "subsample": ({"examples": len(self.train_all), "seed": c.split_seed}
                              if len(self.train_all) < self.train_file_size else None),
                "dev": ({"file": self.dev_file.path} if self.dev_file is not None
                        else {"fraction": c.dev_fraction, "seed": c.split_seed, "from": self.train_all.path}),
                "train_examples": self.n_train, "dev_examples": self.n_dev, "test_examples": len(self.test),
                "reader": self.test.reader, "labels": self.labels, "bio": self.bio}

    def label_ids(self, data: LabelledData) -> np.ndarray:
        """One id per sentence (classify) or per token (tag); -1 for a label training never has."""
        flat = data.labels if data.task == "classify" else [t for tags in data.labels for t in tags]
        return np.array([self.label_id.get(label, -1) for label in flat], dtype=np.int64)


# ----------------------------------------------------------------------------- inputs of a head

class Split:
    """Sentences ``ids`` of one file's vectors as a head reads them: one vector per example
    (pooled sentence or token; ``x`` indexed by ``rows``), or padded sentences (``sequences``)."""

    def __init__(self, x: torch.Tensor, offsets: torch.Tensor, ids: np.ndarray, y: torch.Tensor,
                 task: str, sequences: bool, per_sentence_x: bool):
        self.x, self.offsets, self.task, self.sequences = x, offsets, task, sequences
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.lengths = (offsets[self.ids + 1] - offsets[self.ids])
        self.token_rows = torch.from_numpy(token_rows(offsets.numpy(), np.asarray(ids)))
        self.y = y  # per sentence (classify) or per token of the file (tag)
        if sequences:
            self.n = len(self.ids)
        elif task == "classify":
            self.n, self.rows = len(self.ids), self.ids if per_sentence_x else None
        else:
            self.n, self.rows = len(self.token_rows), self.token_rows

    def batch(self, picks: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        if not self.sequences:
            rows = self.rows[picks]
            labels = self.y[self.ids[picks]] if self.task == "classify" else self.y[rows]
            return self.x[rows].float(), None, labels
        ids = self.ids[picks]
        starts, lengths = self.offsets[ids], self.lengths[picks]
        steps = torch.arange(int(lengths.max()))
        mask = steps.unsqueeze(0) < lengths.unsqueeze(1)
        positions = torch.where(mask, starts.unsqueeze(1) + steps, torch.zeros_like(starts).unsqueeze(1))
        x = self.x[positions].float()
        x = x * mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)
        labels = self.y[ids] if self.task == "classify" else torch.where(mask, self.y[positions], IGNORE)
        return x, mask, labels

    def batches(self, size: int, generator: Optional[torch.Generator] = None):
        order = torch.randperm(self.n, generator=generator) if generator is not None else torch.arange(self.n)
        for start in range(0, self.n, size):
            yield self.batch(order[start:start + size])


def _segment_pool(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(n_tokens, D) float32 -> (n_sentences, 2D): each sentence's mean and max (every sentence has a token)."""
    starts = offsets[:-1].numpy()
    array = x.numpy()
    means = np.add.reduceat(array, starts, axis=0) / np.diff(offsets.numpy()).astype(np.float32)[:, None]
    return torch.from_numpy(np.concatenate([means, np.maximum.reduceat(array, starts, axis=0)], axis=1))


CHUNK = 1 << 16  # tokens a time: float32 temporaries stay small


def token_rows(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The rows of the sentences ``ids`` in a file's vectors, sentence after sentence."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in ids])


class Standardizer:
    """Each layer's dimensions to mean 0 and standard deviation 1 over the training split's tokens:
    heads then train alike on biLMs whose layers differ in scale (a random biLM's are tens of times
    smaller than a trained one's), and the mix weights compare layers on one scale. A per-dimension
    affine map commutes with max pooling, and a linear head can undo it: it changes what the
    optimizer sees, not what a fixed setting can express."""

    def __init__(self, layers: np.ndarray, rows: np.ndarray):
        total = np.zeros(layers.shape[1:], dtype=np.float64)
        squares = np.zeros(layers.shape[1:], dtype=np.float64)
        for start in range(0, len(rows), CHUNK):
            block = layers[rows[start:start + CHUNK]].astype(np.float64)
            total += block.sum(0)
            squares += (block ** 2).sum(0)
        n = max(len(rows), 1)
        self.mean = (total / n).astype(np.float32)
        self.std = np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0)).astype(np.float32)
        self.std[self.std < 1e-6] = 1.0  # a constant dimension stays constant (zero)

    def __call__(self, layers: np.ndarray) -> torch.Tensor:
        """float16 (n_tokens, n_layers, dim), standardized."""
        out = np.empty(layers.shape, dtype=np.float16)
        for start in range(0, len(layers), CHUNK):
            out[start:start + CHUNK] = (layers[start:start + CHUNK].astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(out)


def head_inputs(layers: torch.Tensor, offsets: np.ndarray, setting: Setting, task: str, head: str
                ) -> tuple[torch.Tensor, bool, bool]:
    """The tensor the head's batches are cut from, whether they are padded sentences, and whether
    the tensor has a row per sentence: fixed settings are selected (and, for a pooled head,
    pooled) once here; a mix keeps every layer."""
    mix = setting.layer == "mix"
    sequences = head == "cnn" or (task == "classify" and mix)
    if mix:
        return layers, sequences, False
    selected = select_layers(layers, setting)
    if task == "classify" and not sequences:
        return _segment_pool(selected, torch.from_numpy(offsets)), False, True
    return selected, sequences, False


# ----------------------------------------------------------------------------- one head

@torch.no_grad()
def predict(net: ProbeNet, split: Split) -> tuple[np.ndarray, float]:
    """Predicted label ids, one per sentence (classify) or per token in the split's order, and
    the mean loss on the split's known labels."""
    net.eval()
    out, loss, count = [], 0.0, 0
    size = BATCH_SENTENCES if split.sequences or split.task == "classify" else BATCH_TOKENS
    for x, mask, labels in split.batches(size):
        logits = net(x, mask)
        predicted = logits.argmax(-1)
        out.append(predicted[mask] if split.sequences and split.task == "tag" else predicted)
        known = labels.reshape(-1) >= 0  # neither padding nor a label training never had
        if known.any():
            loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1])[known], labels.reshape(-1)[known],
                                          reduction="sum"))
            count += int(known.sum())
    return (torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)), loss / max(count, 1)


def scores(task: Task, split: Split, predicted: np.ndarray, gold: np.ndarray,
           gold_tags: Optional[list[list[str]]] = None) -> dict[str, float]:
    """Accuracy (and span F1 for BIO tags), in percent; a gold label training never had is wrong."""
    out = {"accuracy": accuracy(gold, predicted)}
    if task.bio:
        lengths = split.lengths.numpy()
        cuts = np.cumsum(lengths)[:-1]
        guessed = [[task.labels[i] for i in sentence] for sentence in np.split(predicted, cuts)]
        out["f1"] = span_f1(gold_tags, guessed)["f1"]
    return out


def fit(net: ProbeNet, train: Split, dev: Split, dev_score: Callable[[np.ndarray], float], config: ProbeConfig,
        seed: int) -> tuple[int, float]:
    """Adam on the training split; after each epoch the dev score (its loss breaks ties: on a small
    dev split the score often stays put while the head still improves); stops after ``patience``
    epochs without a better one and keeps the best epoch's weights. Returns (that epoch, its dev score)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    size = BATCH_SENTENCES if train.sequences or train.task == "classify" else BATCH_TOKENS
    best, best_epoch, best_state, waited = (-1.0, 0.0), 0, None, 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        for x, mask, labels in train.batches(size, generator):
            logits = net(x, mask)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        predicted, dev_loss = predict(net, dev)
        score = (dev_score(predicted), -dev_loss)
        if score > best:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= config.patience:
                break
    net.load_state_dict(best_state)
    return best_epoch, best[0]


# ----------------------------------------------------------------------------- settings x seeds

def summary(runs: list[float]) -> dict:
    """Mean, standard deviation (n - 1; 0 for one run) and every run."""
    values = np.asarray(runs, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "runs": [float(v) for v in values]}


class Prober:
    """Runs settings x seeds for one model on one ``Task``, the vectors of each file from the cache
    or one embedding pass. Seconds spent embedding and training heads add up in ``seconds``."""

    def __init__(self, task: Task, cache_dir: Optional[str], pretokenized: bool = False, precision: str = "fp32",
                 device: str = "cpu", batch_size: int = 64, progress: bool = True):
        self.task = task
        self.cache_dir, self.pretokenized, self.precision = cache_dir, pretokenized, precision
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.seconds = {"embed": 0.0, "heads": 0.0}
        self.n_split = 0
        self.cache_hits = 0      # files whose vectors came from the cache
        self.embedded = 0        # files embedded
        self.y_train = torch.from_numpy(task.label_ids(task.train_all))
        self.y_test = torch.from_numpy(task.label_ids(task.test))
        self.y_dev = torch.from_numpy(task.label_ids(task.dev_file)) if task.dev_file is not None else None

    def vectors(self, model: ProbedModel, data: LabelledData, what: str) -> Vectors:
        start = time.perf_counter()
        vectors = file_vectors(model, data, self.cache_dir, self.pretokenized, self.precision, self.device,
                               self.batch_size, self.progress, desc=f"embed {what}")
        self.seconds["embed"] += time.perf_counter() - start
        self.cache_hits += vectors.from_cache
        self.embedded += not vectors.from_cache
        self.n_split = max(self.n_split, vectors.n_split)
        return vectors

    def run(self, model: ProbedModel, settings: list[Setting], desc: str = "heads") -> dict[str, dict]:
        """Every setting (of this model) x every seed: results by the setting's key."""
        task, config = self.task, self.task.config
        train_vectors = self.vectors(model, task.train_all, "train")
        test_vectors = self.vectors(model, task.test, "test")
        dev_vectors = self.vectors(model, task.dev_file, "dev") if task.dev_file is not None else None
        start = time.perf_counter()
        n_layers, dim = train_vectors.layers.shape[1:]
        standardize = Standardizer(train_vectors.layers, token_rows(train_vectors.offsets, task.train_ids))
        train_layers, test_layers = standardize(train_vectors.layers), standardize(test_vectors.layers)
        dev_layers = standardize(dev_vectors.layers) if dev_vectors is not None else None
        results: dict[str, dict] = {}
        bar = progress_bar(total=len(settings) * config.seeds, unit="head", desc=desc, disable=not self.progress)
        with bar:
            for setting in settings:
                def inputs(layers: torch.Tensor, vectors: Vectors) -> tuple[torch.Tensor, bool, bool]:
                    return head_inputs(layers, vectors.offsets, setting, config.task, config.head)

                def split(head_input: tuple, vectors: Vectors, ids: np.ndarray, y: torch.Tensor) -> Split:
                    x, sequences, per_sentence = head_input
                    return Split(x, torch.from_numpy(vectors.offsets), ids, y, config.task, sequences, per_sentence)

                # The training file's inputs (a layer selected, or its sentences pooled) once: a dev
                # split carved from it reads the same tensor.
                train_inputs = inputs(train_layers, train_vectors)
                train = split(train_inputs, train_vectors, task.train_ids, self.y_train)
                if dev_vectors is not None:
                    dev = split(inputs(dev_layers, dev_vectors), dev_vectors, np.arange(len(task.dev_file)),
                                self.y_dev)
                    dev_data = task.dev_file
                else:
                    dev = split(train_inputs, train_vectors, task.dev_ids, self.y_train)
                    dev_data = task.train_all  # the split's ids index the training file
                test = split(inputs(test_layers, test_vectors), test_vectors, np.arange(len(task.test)), self.y_test)
                dev_gold = self._gold(dev, dev_data)
                test_gold = self._gold(test, task.test)
                runs: dict[str, list] = {"test": [], "dev": [], "epochs": [], "mix": []}
                for seed in range(config.seeds):
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)  # the head's initial weights and its dropout
                        net = build_net(config.task, config.head, setting, n_layers, dim, len(task.labels))
                        epoch, dev_score = fit(net, train, dev, lambda p: scores(task, dev, p, *dev_gold)[task.metric],
                                               config, seed)
                    runs["test"].append(scores(task, test, predict(net, test)[0], *test_gold))
                    runs["dev"].append(dev_score)
                    runs["epochs"].append(epoch)
                    runs["mix"].append(net.mix_weights())
                    bar.update(1)
                results[setting.key] = self._result(runs)
        self.seconds["heads"] += time.perf_counter() - start
        return results

    def _gold(self, split: Split, data: LabelledData) -> tuple[np.ndarray, Optional[list[list[str]]]]:
        """Gold label ids in the order ``predict`` returns them, and the gold tags for span F1
        (``data``: the file whose sentences the split's ids index)."""
        if self.task.config.task == "classify":
            return split.y[split.ids].numpy(), None
        tags = [data.labels[i] for i in split.ids.tolist()] if self.task.bio else None
        return split.y[split.token_rows].numpy(), tags

    def _result(self, runs: dict[str, list]) -> dict:
        out = {"accuracy": summary([r["accuracy"] for r in runs["test"]])}
        if self.task.bio:
            out["f1"] = summary([r["f1"] for r in runs["test"]])
        out["dev"] = summary(runs["dev"])
        out["epochs"] = runs["epochs"]
        if runs["mix"][0] is not None:
            weights = np.array([w for w, _ in runs["mix"]])
            out["mix_weights"] = [float(v) for v in weights.mean(0)]
            out["mix_weights_runs"] = weights.tolist()
            out["gamma"] = summary([g for _, g in runs["mix"]])
        return out


# ----------------------------------------------------------------------------- one model, one report

def make_report(task: Task, prober: Prober, model: str, settings: list[Setting], results: dict) -> dict:
    """The JSON ``bilm probe --json`` writes (scores in percent)."""
    c = task.config
    return {"task": c.task, "metric": task.metric, "head": c.head, "seeds": c.seeds, "model": model,
            **task.describe(), "unit": "sentences",
            "training": {"max_epochs": c.epochs, "patience": c.patience, "lr": c.lr, "optimizer": "adam",
                         "batch": f"{BATCH_SENTENCES} sentences" if c.task == "classify" or c.head == "cnn"
                         else f"{BATCH_TOKENS} tokens", "chosen_on": "dev"},
            "settings": [s.key for s in settings], "results": results,
            "tokens_split_into_pieces": prober.n_split, "cache_hits": prober.cache_hits,
            "files_embedded": prober.embedded,
            "precision": prober.precision, "seconds": {k: round(v, 3) for k, v in prober.seconds.items()}}


def probe_model(model: ProbedModel, task: Task, prober: Prober, settings: list[Setting],
                control: Optional[ProbedModel] = None) -> dict:
    """Every setting of ``model`` (and of ``control`` for the random ones) x every seed: the report."""
    own = [s for s in settings if not s.random]
    random = [s for s in settings if s.random]
    results = prober.run(model, own) if own else {}
    if random:
        if control is None:
            raise ValueError("random settings need the control model")
        results.update(prober.run(control, random, desc="heads (random)"))
    ordered = {s.key: results[s.key] for s in settings}
    return make_report(task, prober, model.description, settings, ordered)
