"""Document classification the way ELMo tutorials show it, in plain PyTorch.

Every document is embedded once with ``ElmoEmbedder`` (the average of the biLM's layers: a
(n_tokens, 2 * projection_dim) matrix, (n_tokens, 1024) for the published models); a small
1-D convolutional network over those vectors is then trained and its test accuracy printed.

    python examples/classify_cnn.py                     # the published `original` model (downloaded once)
    python examples/classify_cnn.py --model small       # another published model
    python examples/classify_cnn.py --model demo_out/export   # the model `make demo` exported

The data is examples/data/{train,test}.tsv ("label<TAB>sentence"; sports / science / cooking /
finance, written for this project). Tutorials use Keras; the network here is the same idea:
Conv1d over tokens, max over time, a linear layer.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify import DATA_DIR, read_split  # noqa: E402  (the same data and tokenization)

from bilm import ElmoEmbedder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="original",
                   help="published model name or a directory with options.json + weights.hdf5 (default: original)")
    p.add_argument("--data", default=DATA_DIR, help="folder with train.tsv and test.tsv (default: examples/data)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--filters", type=int, default=64, help="convolution filters per width (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per step (default: 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the network's init and batch order (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each split (quick checks)")
    return p.parse_args(argv)


def embed(embedder, documents):
    """(n_docs, max_tokens, dim) average of the ELMo layers, zero-padded, and the lengths."""
    vectors = [v.mean(axis=0) for v in embedder.embed_sentences(documents)]  # each (n_tokens, dim)
    x = torch.zeros(len(vectors), max(len(v) for v in vectors), vectors[0].shape[-1])
    for i, v in enumerate(vectors):
        x[i, : len(v)] = torch.from_numpy(v)
    return x


class ConvClassifier(nn.Module):
    """Conv1d (widths 2, 3, 4) over the token vectors, max over time, dropout, linear."""

    def __init__(self, dim, n_classes, filters, widths=(2, 3, 4)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w, padding=w - 1) for w in widths)
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(filters * len(widths), n_classes))

    def forward(self, x):  # (batch, tokens, dim); padding is zero, and relu then max ignores it
        x = x.transpose(1, 2)
        return self.out(torch.cat([torch.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=-1))


def main(argv=None):
    args = parse_args(argv)
    train_labels, train_docs = read_split(os.path.join(args.data, "train.tsv"), args.limit)
    test_labels, test_docs = read_split(os.path.join(args.data, "test.tsv"), args.limit)
    classes = sorted(set(train_labels))
    start = time.perf_counter()
    # Stateless: a document's vectors do not depend on the documents embedded before it.
    embedder = ElmoEmbedder(args.model, device=args.device, stateful=False)
    x_train, x_test = embed(embedder, train_docs), embed(embedder, test_docs)
    y_train = torch.tensor([classes.index(c) for c in train_labels])
    y_test = torch.tensor([classes.index(c) for c in test_labels])
    print(f"embedded {len(train_docs)} + {len(test_docs)} documents -> vectors of {x_train.shape[-1]} "
          f"in {time.perf_counter() - start:.1f}s")

    torch.manual_seed(args.seed)
    model = ConvClassifier(x_train.shape[-1], len(classes), args.filters).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for batch in torch.randperm(len(y_train), generator=order).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch].to(args.device)), y_train[batch].to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(x_test.to(args.device)).argmax(dim=-1).cpu()
    accuracy = (predicted == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f} ({len(classes)} classes, chance {1 / len(classes):.3f}; "
          f"{time.perf_counter() - start:.1f}s in all)")
    return accuracy


if __name__ == "__main__":
    main()
