"""Sentence classification on ELMo features: the downstream use the ELMo paper shows.

The biLM stays frozen. Every sentence is embedded once; a small head is then trained on a
task-specific weighted sum of the biLM's layers (a ScalarMix, Peters et al. 2018, eq. 1).
The same head is also trained on layer 0 alone -- the char-CNN token vectors, which know
nothing about the words around them -- so the printed gap is what context adds.

    python examples/classify.py                        # the model `make demo` exported
    python examples/classify.py --options options.json --weights weights.hdf5

The data (examples/data/{train,test}.tsv, "label<TAB>sentence") is a small topic set:
sports / science / cooking / finance, written for this project (see examples/data/README.md).
"""
import argparse
import os
import re
import sys
import time

import torch
from torch import nn

from bilm import ElmoEmbedder
from bilm.modules.scalar_mix import ScalarMix

# Paths are relative to the repository, not the working directory, so the script runs from anywhere.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "examples", "data")
DEMO_OPTIONS = os.path.join(REPO, "demo_out", "export", "options.json")
DEMO_WEIGHTS = os.path.join(REPO, "demo_out", "export", "weights.hdf5")
FIXTURE_OPTIONS = os.path.join(REPO, "tests", "fixtures", "bilm-tf", "model", "options.json")
FIXTURE_WEIGHTS = os.path.join(REPO, "tests", "fixtures", "bilm-tf", "model", "lm_weights.hdf5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--options", default=None,
                   help="options.json of the biLM (default: demo_out/export/options.json, "
                        "else the test fixture model)")
    p.add_argument("--weights", default=None,
                   help="weights.hdf5 of the biLM (default: demo_out/export/weights.hdf5, "
                        "else the test fixture model)")
    p.add_argument("--data", default=DATA_DIR, help="folder with train.tsv and test.tsv (default: examples/data)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of each head (default: 20)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step (default: 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--hidden", type=int, default=128, help="hidden units of the head (default: 128)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout in the head (default: 0.2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the heads' init and batch order (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N sentences of each split (quick checks)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model files

def resolve_model(args):
    """Explicit paths win; otherwise the demo's export, or the fixture model if there is none."""
    if args.options is not None or args.weights is not None:
        if args.options is None or args.weights is None:
            sys.exit("give both --options and --weights")
        return args.options, args.weights
    if os.path.exists(DEMO_OPTIONS) and os.path.exists(DEMO_WEIGHTS):
        return DEMO_OPTIONS, DEMO_WEIGHTS
    print(f"note: no demo model at {os.path.relpath(DEMO_OPTIONS, REPO)} (run `make demo` first); "
          "using the tiny test fixture model, whose vectors carry little meaning")
    return FIXTURE_OPTIONS, FIXTURE_WEIGHTS


# ----------------------------------------------------------------------------- data

def tokenize(text):
    # The biLM was trained on whitespace-tokenized text with punctuation split off (WikiText
    # style), so split punctuation and the possessive 's the same way.
    text = re.sub(r"([.,;:!?()\"])", r" \1 ", text)
    text = re.sub(r"'s\b", " 's", text)
    return text.split()


def read_split(path, limit):
    labels, sentences = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            label, text = line.rstrip("\n").split("\t", 1)
            tokens = tokenize(text)
            if tokens:  # a sentence with no tokens has nothing to pool
                labels.append(label)
                sentences.append(tokens)
    if limit is not None:
        labels, sentences = labels[:limit], sentences[:limit]
    return labels, sentences


# ----------------------------------------------------------------------------- features

def token_features(embedder, sentences, batch_size=64):
    """All biLM layers for every token, padded: features (n_sentences, n_layers, max_len, dim)
    and mask (n_sentences, max_len), True at real tokens. The biLM runs once; the head then
    trains on these fixed vectors."""
    # Sort by length so batches hold sentences of similar length (less padding). The embedder
    # is stateless, so a sentence's vectors do not depend on its batch and the order is free.
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    vectors = [None] * len(sentences)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, layers in zip(batch, embedder.embed_batch([sentences[j] for j in batch])):
            vectors[i] = layers  # (n_layers, n_tokens, dim)
    n_layers, _, dim = vectors[0].shape
    max_len = max(v.shape[1] for v in vectors)
    features = torch.zeros(len(vectors), n_layers, max_len, dim)
    mask = torch.zeros(len(vectors), max_len, dtype=torch.bool)
    for i, v in enumerate(vectors):
        features[i, :, : v.shape[1]] = torch.from_numpy(v)
        mask[i, : v.shape[1]] = True
    return features, mask


def standardize(train, train_mask, *others):
    """Scale every (layer, dim) feature to zero mean and unit variance over the training tokens.

    biLM layers sit on large, layer-specific offsets and vary little between words (a small
    biLM's most of all); centred, unit-scale inputs let one learning rate suit both heads.
    It is a fixed per-layer affine map, as ELMo's optional layer norm, so the scalar mix still
    weighs whole layers. (Padded positions change too; the head masks them out.)
    """
    real = train.permute(1, 3, 0, 2)[..., train_mask]  # (n_layers, dim, n_real_tokens)
    mean = real.mean(dim=-1)[None, :, None]  # broadcast over (n_sentences, n_layers, max_len, dim)
    std = real.std(dim=-1)[None, :, None] + 1e-6
    return [(x - mean) / std for x in (train, *others)]


# ----------------------------------------------------------------------------- the head

class Classifier(nn.Module):
    """ScalarMix of the layers at every token, mean- and max-pooled over the sentence, then a
    one-hidden-layer MLP.

    The head has no context of its own (no LSTM or convolution over tokens; pooling ignores
    order), so whatever the ELMo features gain over layer 0 comes from the biLM's contextual
    layers, not from the head learning word order itself.
    """

    def __init__(self, n_layers, dim, n_classes, hidden, dropout):
        super().__init__()
        self.mix = ScalarMix(n_layers, do_layer_norm=False)
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * dim, hidden),  # [mean; max]
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, features, mask):  # (batch, n_layers, max_len, dim), (batch, max_len)
        tokens = self.mix(list(features.unbind(dim=1)))  # (batch, max_len, dim)
        m = mask.unsqueeze(-1)
        mean = (tokens * m).sum(dim=1) / m.sum(dim=1)
        max_ = tokens.masked_fill(~m, float("-inf")).amax(dim=1)
        return self.mlp(torch.cat([mean, max_], dim=-1))


@torch.no_grad()
def accuracy(model, x, mask, y, chunk=256):
    model.eval()
    correct = sum((model(x[i : i + chunk], mask[i : i + chunk]).argmax(dim=-1) == y[i : i + chunk]).sum().item()
                  for i in range(0, len(y), chunk))
    return correct / len(y)


def train_head(name, train, test, n_classes, args):
    (x_train, m_train, y_train), (x_test, m_test, y_test) = train, test
    # Same seed for both heads: same initial MLP weights and same batch order, so the two runs
    # differ only in their input features.
    torch.manual_seed(args.seed)
    model = Classifier(x_train.shape[1], x_train.shape[3], n_classes, args.hidden, args.dropout).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order_rng = torch.Generator().manual_seed(args.seed)
    log_every = max(1, args.epochs // 4)
    for epoch in range(1, args.epochs + 1):
        model.train()
        total_loss = 0.0
        for batch in torch.randperm(len(y_train), generator=order_rng).split(args.batch_size):
            batch = batch.to(args.device)
            loss = nn.functional.cross_entropy(model(x_train[batch], m_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        if epoch % log_every == 0 or epoch == args.epochs:
            print(f"  [{name}] epoch {epoch:3d}  loss {total_loss / len(y_train):.4f}  "
                  f"train acc {accuracy(model, x_train, m_train, y_train):.3f}")
    # No early stopping and no model selection on the test split: train for a fixed number
    # of epochs and evaluate once at the end.
    return model, accuracy(model, x_test, m_test, y_test)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # (each head reseeds too; the biLM pass is deterministic)
    t0 = time.time()

    options_file, weight_file = resolve_model(args)
    print(f"biLM: {options_file}\n      {weight_file}")

    train_labels, train_sents = read_split(os.path.join(args.data, "train.tsv"), args.limit)
    test_labels, test_sents = read_split(os.path.join(args.data, "test.tsv"), args.limit)
    classes = sorted(set(train_labels))
    unknown = set(test_labels) - set(classes)
    if unknown:
        sys.exit(f"test labels not seen in training: {sorted(unknown)}")
    y_train = torch.tensor([classes.index(c) for c in train_labels], device=args.device)
    y_test = torch.tensor([classes.index(c) for c in test_labels], device=args.device)
    print(f"data: {len(train_sents)} train / {len(test_sents)} test sentences, classes {classes}")

    # stateful=False: vectors depend only on the sentence itself, so features are reproducible
    # and a test sentence is not influenced by whatever was embedded before it.
    embedder = ElmoEmbedder(options_file, weight_file, device=args.device, stateful=False)
    x_train, m_train = token_features(embedder, train_sents)
    x_test, m_test = token_features(embedder, test_sents)
    del embedder
    x_train, x_test = standardize(x_train, m_train, x_test)
    x_train, m_train, x_test, m_test = (t.to(args.device) for t in (x_train, m_train, x_test, m_test))
    n_layers, dim = x_train.shape[1], x_train.shape[3]
    print(f"features: {n_layers} layers x {dim} dims per token ({time.time() - t0:.1f}s)")

    # The head's tensors are small: one CPU thread avoids thread hand-off costs, which
    # dominate such small ops (and are much worse when other work shares the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        elmo_model, elmo_acc = train_head("ELMo", (x_train, m_train, y_train), (x_test, m_test, y_test),
                                          len(classes), args)
        # Layer 0 is the char-CNN token vector (written twice, [x, x], to match the LSTM
        # layers' width): a context-free word embedding. Same head, a one-layer "mix".
        _, base_acc = train_head("layer 0", (x_train[:, :1], m_train, y_train), (x_test[:, :1], m_test, y_test),
                                 len(classes), args)
    finally:
        torch.set_num_threads(threads)

    weights = torch.softmax(elmo_model.mix.weights.detach(), dim=0).cpu().tolist()
    print("learned layer weights (softmax): " + ", ".join(f"layer {i}: {w:.2f}" for i, w in enumerate(weights)))
    print(f"test accuracy, ELMo (scalar mix of all {n_layers} layers): {elmo_acc:.3f}")
    print(f"test accuracy, layer 0 only (context-free baseline):  {base_acc:.3f}")
    print(f"done in {time.time() - t0:.1f}s")
    return {"elmo": elmo_acc, "baseline": base_acc}


if __name__ == "__main__":
    main()
