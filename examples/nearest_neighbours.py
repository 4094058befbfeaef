"""Nearest neighbours of a word's contextual vectors: does the biLM tell its senses apart?

    python examples/nearest_neighbours.py --input data/sample/demo_sentences.txt \
        --embeddings demo_out/sentences.hdf5 --word bank

Reads what ``bilm embed`` wrote (one dataset per input line, shape (layers, tokens, dim))
and prints, for every occurrence of --word, the shapes, and its nearest other occurrence by
cosine similarity in the token layer (layer 0: context-free, so every occurrence is the
same vector) and in the top LSTM layer (which sees the sentence). With a well-trained biLM
the money senses pair up and the river senses pair up; a minutes-old demo model may not.
"""
import argparse
import json

import h5py
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="the text file given to `bilm embed`")
    p.add_argument("--embeddings", required=True, help="the HDF5 file `bilm embed` wrote (--layers all)")
    p.add_argument("--word", default="bank", help="the word to compare across sentences (default: bank)")
    args = p.parse_args(argv)

    with open(args.input, encoding="utf-8") as f:
        sentences = [line.split() for line in f if line.strip()]
    with h5py.File(args.embeddings, "r") as f:
        index = json.loads(f["sentence_to_index"][0])
        vectors = {}
        for line in sentences:
            data = f[index[" ".join(line)]][()]
            print(f"{' '.join(line)[:60]:60s} -> {data.shape} (layers, tokens, dim)")
            for position, token in enumerate(line):
                if token == args.word:
                    vectors[len(vectors)] = (line, data[:, position])
    if len(vectors) < 2:
        raise SystemExit(f"'{args.word}' occurs {len(vectors)} time(s) in {args.input}; need at least 2")

    def nearest(i, layer):
        a = vectors[i][1][layer]
        best = max((j for j in vectors if j != i), key=lambda j: cosine(a, vectors[j][1][layer]))
        return best, cosine(a, vectors[best][1][layer])

    print(f"\nnearest other '{args.word}' by cosine similarity (layer 0 = context-free, top = last LSTM layer):")
    for i in sorted(vectors):
        line = vectors[i][0]
        j0, s0 = nearest(i, 0)
        jt, st = nearest(i, -1)
        print(f"  [{i}] {' '.join(line)[:50]:50s} layer 0: [{j0}] {s0:.3f}   top: [{jt}] {st:.3f}")


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


if __name__ == "__main__":
    main()
