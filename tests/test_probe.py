"""bilm probe: the readers and their errors, conlleval's span F1, the heads and the mix, the vector
cache, the random control, and whole probes of tiny biLMs built here (a few seconds each)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from bilm.cli import main
from bilm.core.errors import InputError
from bilm.core.options import BiLMOptions
from bilm.evaluation.heads import Setting, build_net, parse_settings
from bilm.evaluation.metrics import chunk_counts, is_bio, span_f1
from bilm.evaluation.probe import ProbeConfig, Prober, Task, probe_model
from bilm.evaluation.probe_data import read_classification, read_tagging
from bilm.evaluation.vectors import cache_key, cache_path, file_vectors, model_from_files, random_control
from bilm.modules.bidirectional import BidirectionalLM
from bilm.modules.weight_file import save_weights

OPTIONS = {"lstm": {"dim": 32, "projection_dim": 16, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                    "use_skip_connections": True},
           "char_cnn": {"activation": "relu", "embedding": {"dim": 4}, "filters": [[1, 16], [2, 16]],
                        "max_characters_per_token": 20, "n_characters": 262, "n_highway": 1}}


def write_model(directory, seed: int = 1, options: dict = OPTIONS) -> str:
    """A biLM with random weights (seed ``seed``) as options.json + weights.hdf5 in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "options.json"), "w") as f:
        json.dump(options, f)
    torch.manual_seed(seed)
    save_weights(BidirectionalLM(BiLMOptions.from_dict(options)), os.path.join(directory, "weights.hdf5"))
    return str(directory)


def write(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def run_cli(*argv, capsys=None) -> tuple[int, str, str]:
    rc = main(["probe", "--no-progress", *argv])
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model"))


# ----------------------------------------------------------------------------- synthetic tasks

def separable_classification(tmp_path, n_train=120, n_test=40):
    """Class a: sentences of cat/dog/cow; class b: of car/bus/van. Disjoint word sets: the pooled
    vectors of the two classes lie in disjoint hulls, linearly separable for any weights."""
    rng = random.Random(0)
    words = {"a": ["cat", "dog", "cow"], "b": ["car", "bus", "van"]}

    def lines(n):
        out = []
        for _ in range(n):
            label = rng.choice("ab")
            out.append(f"{label}\t" + " ".join(rng.choice(words[label]) for _ in range(rng.randint(1, 6))))
        return out
    return write(tmp_path / "train.tsv", lines(n_train)), write(tmp_path / "test.tsv", lines(n_test))


def previous_word_tagging(tmp_path, n_train=300, n_test=80):
    """Words drawn uniformly from four; a token's tag is X when the previous word is 'red' or
    'blue', else Y (also for the first token). Its own word says nothing about its tag."""
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog"]

    def lines(n):
        out = []
        for _ in range(n):
            previous = None
            for _ in range(rng.randint(3, 9)):
                word = rng.choice(words)
                out.append(f"{word}\t{'X' if previous in ('red', 'blue') else 'Y'}")
                previous = word
            out.append("")
        return out
    return write(tmp_path / "train.txt", lines(n_train)), write(tmp_path / "test.txt", lines(n_test))


def probe(model, train, test, task, layers, cache=None, control=False, **config):
    cfg = ProbeConfig(task, **config)
    data = Task(train, test, cfg)
    prober = Prober(data, cache, progress=False)
    settings = parse_settings(layers, model.n_layers)
    settings += parse_settings(layers, model.n_layers, True) if control else []
    return probe_model(model, data, prober, settings, random_control(model) if control else None)


# ----------------------------------------------------------------------------- span F1 (conlleval)

def test_span_f1_by_hand():
    gold = [["B-NP", "I-NP", "O", "B-VP"]]
    # NP found whole, VP missed: 1 correct of 2 gold, 1 guessed.
    assert chunk_counts(gold, [["B-NP", "I-NP", "O", "O"]]) == (1, 2, 1)
    assert span_f1(gold, [["B-NP", "I-NP", "O", "O"]]) == pytest.approx({"precision": 100.0, "recall": 50.0,
                                                                       "f1": 200 / 3})
    # A chunk cut short is wrong: B-NP alone ends where the gold NP goes on.
    assert chunk_counts(gold, [["B-NP", "O", "O", "B-VP"]]) == (1, 2, 2)
    # The right span with the wrong type is wrong.
    assert chunk_counts(gold, [["B-VP", "I-VP", "O", "B-VP"]]) == (1, 2, 2)


def test_span_f1_chunk_cut_at_the_sentence_end():
    # A chunk still open at the end of a sentence ends there; the next sentence's I- starts a new
    # one (conlleval reads I after O, which a sentence boundary is, as a start).
    gold = [["O", "B-NP", "I-NP"], ["I-NP", "O"]]
    guess = [["O", "B-NP", "I-NP"], ["I-NP", "O"]]
    assert chunk_counts(gold, guess) == (2, 2, 2)
    # Guessing the two as one chunk across the boundary is impossible: each sentence is scored alone.
    assert chunk_counts(gold, [["O", "B-NP", "I-NP"], ["O", "O"]]) == (1, 2, 1)
    assert span_f1(gold, [["O", "B-NP", "I-NP"], ["O", "O"]])["f1"] == pytest.approx(2 * 100 * 50 / 150)


def test_span_f1_iob1_and_empty_cases():
    # I- after O starts a chunk (IOB1); a type change inside I- tags starts another.
    assert chunk_counts([["I-NP", "I-NP", "I-VP"]], [["I-NP", "I-NP", "I-VP"]]) == (2, 2, 2)
    assert chunk_counts([["B-NP", "I-NP"]], [["B-NP", "I-VP"]]) == (0, 1, 2)
    assert span_f1([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert is_bio(["O", "B-PER", "I-PER"]) and not is_bio(["NOUN", "VERB"]) and not is_bio(["O"])


# ----------------------------------------------------------------------------- readers

def test_conllu_reader_skips_comments_ranges_and_empty_nodes(tmp_path):
    row = "\t".join
    path = write(tmp_path / "a.conllu", [
        "# sent_id = 1", "# text = I can't go",
        row(["1", "I", "I", "PRON", "PRP", "_", "3", "nsubj", "_", "_"]),
        row(["2-3", "can't", "_", "_", "_", "_", "_", "_", "_", "_"]),
        row(["2", "ca", "can", "AUX", "MD", "_", "3", "aux", "_", "_"]),
        row(["3", "n't", "not", "PART", "RB", "_", "3", "advmod", "_", "_"]),
        row(["3.1", "go", "go", "VERB", "VB", "_", "_", "_", "_", "_"]),
        "", "# sent_id = 2",
        row(["1", "Go", "go", "VERB", "VB", "_", "0", "root", "_", "_"]), ""])
    data = read_tagging(path)
    assert data.reader == "conllu"
    assert data.tokens == [["I", "ca", "n't"], ["Go"]]
    assert data.labels == [["PRON", "AUX", "PART"], ["VERB"]]
    assert data.lines == [3, 10]
    assert read_tagging(path, tag_column=5).labels == [["PRP", "MD", "RB"], ["VB"]]


def test_column_reader_takes_the_last_column_and_keeps_hash_tokens(tmp_path):
    path = write(tmp_path / "chunks.txt", ["# # B-NP", "He PRP B-NP", "", "ran VBD B-VP", "fast RB O"])
    data = read_tagging(path)
    assert data.reader == "columns"
    assert data.tokens == [["#", "He"], ["ran", "fast"]]
    assert data.labels == [["B-NP", "B-NP"], ["B-VP", "O"]]
    assert read_tagging(path, tag_column=2).labels == [["#", "PRP"], ["VBD", "RB"]]


@pytest.mark.parametrize("lines, task, expected", [
    (["pos\tgood film", "neg bad film"], "classify", "train.txt, line 2: no tab"),
    (["pos\tgood film", "\tbad film"], "classify", "train.txt, line 2: empty label"),
    (["pos\tgood film", "neg\t  "], "classify", "train.txt, line 2: empty text"),
    ([], "classify", "train.txt: no examples (empty file"),
    (["", "  "], "tag", "train.txt: no sentences (empty file"),
    (["He PRP B-NP", "ran VBD", "", "x y z"], "tag", "train.txt, line 2: 2 columns, but the sentence's first line "
                                                      "(line 1) has 3"),
])
def test_bad_files_get_one_line_naming_file_and_line(tmp_path, capsys, model_dir, lines, task, expected):
    train = write(tmp_path / "train.txt", lines)
    rc, out, err = run_cli("--model", model_dir, "--task", task, "--train", train, "--test", train, capsys=capsys)
    assert rc == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert expected in err, err


def mr_like(n: int, layout: str, header: bool = False) -> list[str]:
    """``n`` lines of a two-class task written as a spreadsheet would: label<TAB>text, or text<TAB>label
    (GLUE's SST-2 layout), with or without a header line."""
    words = {"pos": ["good", "fine", "great"], "neg": ["bad", "dull", "awful"]}
    rows = [("pos" if i % 2 else "neg", f"a {words['pos' if i % 2 else 'neg'][i % 3]} film number {i}")
            for i in range(n)]
    if layout == "label_text":
        return (["label\tsentence"] if header else []) + [f"{label}\t{text}" for label, text in rows]
    return (["sentence\tlabel"] if header else []) + [f"{text}\t{label}" for label, text in rows]


def test_conll2003_document_markers_are_not_sentences(tmp_path):
    path = write(tmp_path / "ner.txt", ["-DOCSTART- -X- -X- O", "", "EU NNP B-NP B-ORG", "rejects VBZ B-VP O", "",
                                        "-DOCSTART- -X- -X- O", "Peter NNP B-NP B-PER", "", ""])
    data = read_tagging(path)
    assert data.tokens == [["EU", "rejects"], ["Peter"]] and data.labels == [["B-ORG", "O"], ["B-PER"]]
    assert data.lines == [3, 7]


def test_classification_header_is_skipped_and_columns_can_be_chosen(tmp_path):
    data = read_classification(write(tmp_path / "a.tsv", mr_like(12, "label_text", header=True)))
    assert data.header_line == 1 and data.lines[0] == 2 and len(data) == 12
    assert data.label_set() == ["neg", "pos"] and data.texts[0] == "a bad film number 0"
    glue = read_classification(write(tmp_path / "b.tsv", mr_like(12, "text_label", header=True)), label_column=2)
    assert glue.header_line == 1 and glue.labels == data.labels and glue.texts == data.texts
    assert glue.reader == "tsv:label=2,text=last" and data.reader == "tsv"
    # CoLA's layout: source, label, original label, sentence
    cola = read_classification(write(tmp_path / "c.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.",
                                                           "gj04\t0\t*\tThey drank the pub."]), label_column=2)
    assert cola.labels == ["1", "0"] and cola.texts[1] == "They drank the pub." and cola.header_line is None
    assert read_classification(str(tmp_path / "c.tsv"), label_column=2, text_column=1).texts == ["gj04", "gj04"]
    # a label that merely looks like a header word is kept when other lines have it too
    kept = read_classification(write(tmp_path / "d.tsv", ["class\tx y", "class\tz", "other\tw"]))
    assert kept.header_line is None and kept.labels == ["class", "class", "other"]


def test_csv_files_are_read_as_csv(tmp_path):
    import csv

    rows = [("pos", 'a "great", moving film'), ("neg", "dull,\nlong and flat"), ("pos", "fine")]
    with open(tmp_path / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])  # a header, text first: as Kaggle files come
        writer.writerows([(text, label) for label, text in rows])
        writer.writerow([])
        writer.writerow(["last one", "neg"])
    data = read_classification(str(tmp_path / "reviews.csv"), label_column=2)
    assert data.header_line == 1 and data.reader == "csv:label=2,text=last"
    assert data.labels == ["pos", "neg", "pos", "neg"]
    assert data.texts == ['a "great", moving film', "dull,\nlong and flat", "fine", "last one"]
    assert data.lines == [2, 3, 5, 7]  # a row's first line; the quoted newline makes row 3 two lines
    with open(tmp_path / "label_first.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    assert read_classification(str(tmp_path / "label_first.csv")).texts[0] == 'a "great", moving film'
    with pytest.raises(InputError, match=r"reviews\.csv, line 1: 2 comma-separated columns, too few for "
                                         r"--label-column 3"):
        read_classification(str(tmp_path / "reviews.csv"), label_column=3)


@pytest.mark.parametrize("train_layout, test_layout, argv, expected", [
    # a GLUE file read as label<TAB>text: every "label" is a sentence
    ("text_label", "text_label", [], "train.tsv: 30 of 30 lines have a label no other line has (line 1: "
                                     "'a bad film number 0'): column 1 looks like text, not a label; for "
                                     "text<TAB>label give --label-column 2"),
    # the right columns for the training file, the wrong ones for the test file
    ("text_label", "label_text", ["--label-column", "2"], "test.tsv: none of its labels appears in "),
    ("label_text", "text_label", ["--label-column", "2"], "train.tsv: 30 of 30 lines have a label no other line "
                                                          "has (line 1: 'a bad film number 0'): column 2 looks like "
                                                          "text, not a label; --label-column and --text-column apply"
                                                          " to --train, --dev and --test alike"),
    ("label_text", "label_text", ["--label-column", "3"], "train.tsv, line 1: 2 tab-separated columns, too few for "
                                                          "--label-column 3"),
    ("label_text", "label_text", ["--label-column", "1", "--text-column", "1"], "--label-column and --text-column "
                                                                                "are both 1"),
    ("label_text", "label_text", ["--text-column", "0"], "--text-column counts from 1, got 0"),
    ("label_text", "label_text", ["--tag-column", "2"], "--tag-column is for --task tag"),
])
def test_misread_columns_are_one_error_before_any_work(tmp_path, capsys, model_dir, train_layout, test_layout,
                                                       argv, expected):
    train = write(tmp_path / "train.tsv", mr_like(30, train_layout))
    test = write(tmp_path / "test.tsv", mr_like(20, test_layout))
    rc, out, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test, *argv,
                           "--cache-dir", str(tmp_path / "cache"), capsys=capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err, err
    assert not os.path.exists(tmp_path / "cache")  # refused before the model ran


def test_test_labels_none_of_which_training_has_are_an_error(tmp_path, capsys, model_dir):
    train = write(tmp_path / "train.tsv", mr_like(30, "label_text"))
    test = write(tmp_path / "test.tsv", [line.replace("pos", "1").replace("neg", "0")
                                         for line in mr_like(8, "label_text")])
    rc, _, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                         "--no-cache", capsys=capsys)
    assert rc == 1 and err.count("\n") == 1
    assert ("test.tsv: none of its labels appears in " in err and "(line 1: '0';" in err
            and "has 2, e.g. 'neg'" in err), err
    tags = write(tmp_path / "tags.txt", ["He PRP", "ran VBD", "", "She PRP", "sat VBD", ""] * 3)
    other = write(tmp_path / "other.txt", ["He NN", "ran VB", ""])
    rc, _, err = run_cli("--model", model_dir, "--task", "tag", "--train", tags, "--test", other, "--no-cache",
                         capsys=capsys)
    assert rc == 1 and "other.txt: none of its tags appears in" in err and "--tag-column applies to both" in err


def test_a_small_test_file_of_a_task_with_many_classes_is_not_taken_for_text(tmp_path, capsys, model_dir):
    # 40 intents, 3 training examples each; the test file has 12 lines, each intent once
    train = write(tmp_path / "train.tsv", [f"intent{i % 40}\tplease do thing {i % 40} now {i}" for i in range(120)])
    test = write(tmp_path / "test.tsv", [f"intent{i}\tplease do thing {i}" for i in range(12)])
    task = Task(train, test, ProbeConfig("classify"))
    assert len(task.labels) == 40 and len(task.test) == 12 and task.warnings == []


def test_glue_layout_probe_end_to_end_says_it_skipped_the_headers(tmp_path, capsys, model_dir):
    train = write(tmp_path / "train.tsv", mr_like(40, "text_label", header=True))
    test = write(tmp_path / "test.tsv", mr_like(10, "text_label", header=True))
    rc, out, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                           "--label-column", "2", "--layers", "0", "--seeds", "1", "--no-cache", "--json",
                           str(tmp_path / "r.json"), capsys=capsys)
    assert rc == 0, err
    assert "train.tsv, line 1: read as a header and skipped" in err and "test.tsv, line 1: read as a header" in err
    assert "train.tsv: 36 sentences" in out and "test.tsv: 10 sentences" in out
    report = json.load(open(tmp_path / "r.json"))
    assert report["labels"] == ["neg", "pos"] and report["reader"] == "tsv:label=2,text=last"


def test_tag_column_out_of_range(tmp_path, capsys, model_dir):
    train = write(tmp_path / "train.txt", ["He B-NP", "ran B-VP", ""])
    rc, _, err = run_cli("--model", model_dir, "--task", "tag", "--train", train, "--test", train,
                         "--tag-column", "3", capsys=capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "train.txt, line 1: --tag-column 3 is out of range (the line has 2 columns)" in err


def test_batch_size_below_one(tmp_path, capsys, model_dir):
    train, test = separable_classification(tmp_path, 20, 5)
    rc, _, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                         "--batch-size", "0", "--no-cache", capsys=capsys)
    assert rc == 1 and err.count("\n") == 1 and "--batch-size must be at least 1, got 0" in err


def test_model_files_that_disagree(tmp_path, capsys):
    bigger = json.loads(json.dumps(OPTIONS))
    bigger["lstm"]["n_layers"] = 1
    directory = write_model(tmp_path / "model")
    with open(os.path.join(directory, "options.json"), "w") as f:
        json.dump(bigger, f)
    train, test = separable_classification(tmp_path)
    rc, _, err = run_cli("--model", directory, "--task", "classify", "--train", train, "--test", test, capsys=capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "weights.hdf5: holds datasets the options do not describe" in err


def test_unseen_test_label_is_named_and_scored_wrong(tmp_path, capsys, model_dir):
    train, _ = separable_classification(tmp_path)
    test = write(tmp_path / "test.tsv", ["a\tcat dog", "b\tbus car", "c\tcow", "c\tvan van"])
    rc, out, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                           "--layers", "0", "--seeds", "1", "--lr", "0.01", "--no-cache", "--json",
                           str(tmp_path / "r.json"), capsys=capsys)
    assert rc == 0, err
    assert "test.tsv, line 3: label 'c' never appears in" in err and "(2 such lines)" in err
    result = json.loads((tmp_path / "r.json").read_text())["results"]["0"]["accuracy"]
    assert result["mean"] == pytest.approx(50.0)  # the two known ones right, the two unseen wrong


# ----------------------------------------------------------------------------- heads and the mix

def test_mix_weights_are_normalized_and_move(tmp_path, model_dir):
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    train, test = previous_word_tagging(tmp_path)
    report = probe(model, train, test, "tag", "mix", seeds=2, epochs=3, lr=0.01)
    result = report["results"]["mix"]
    for weights in result["mix_weights_runs"]:
        assert len(weights) == 3
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        assert max(abs(w - 1 / 3) for w in weights) > 1e-3  # trained: no longer the uniform start
    assert result["gamma"]["mean"] != pytest.approx(1.0, abs=1e-4)


def test_mix_is_equation_one_of_the_paper():
    net = build_net("tag", "linear", Setting("mix", "mix"), n_layers=3, dim=4, n_classes=2)
    with torch.no_grad():
        net.mix.weights.copy_(torch.tensor([0.0, 1.0, 2.0]))
        net.mix.gamma.fill_(2.0)
    x = torch.randn(5, 3, 4)
    s = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    expected = 2.0 * (s[0] * x[:, 0] + s[1] * x[:, 1] + s[2] * x[:, 2])
    assert torch.allclose(net.mix(list(x.unbind(-2))), expected, atol=1e-6)


def test_settings_are_checked_against_the_model():
    assert [s.layer for s in parse_settings("mix,0,top,average,1", 3)] == ["mix", 0, 2, "average", 1]
    assert parse_settings("mix", 3, random=True)[0].key == "random:mix"
    with pytest.raises(InputError, match="layer 3 does not exist"):
        parse_settings("3", 3)
    with pytest.raises(InputError, match="'last' is not a layer"):
        parse_settings("mix,last", 3)


@pytest.mark.parametrize("head", ["linear", "mlp", "cnn"])
def test_heads_run_on_both_tasks(head):
    for task, x_shape in (("classify", (4, 6, 3, 8)), ("tag", (4, 6, 3, 8))):
        net = build_net(task, head, Setting("mix", "mix"), n_layers=3, dim=8, n_classes=5)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[1, 2:] = False
        mask[2, 1:] = False  # a one-token sentence
        x = torch.randn(*x_shape)
        if task == "tag" and head != "cnn":
            out = net(x[:, 0])  # tokens one by one: (n_tokens, n_layers, dim)
            assert out.shape == (4, 5)
        else:
            out = net(x, mask)
            assert out.shape == ((4, 5) if task == "classify" else (4, 6, 5))
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- whole probes

def test_linearly_separable_classes_reach_100_percent(tmp_path, model_dir):
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    train, test = separable_classification(tmp_path)
    report = probe(model, train, test, "classify", "0,mix", seeds=2, lr=0.01, epochs=30, patience=5)
    for setting in ("0", "mix"):
        assert report["results"][setting]["accuracy"]["runs"] == [100.0, 100.0], report["results"][setting]


def test_context_beats_the_token_layer_when_the_tag_is_the_previous_word(tmp_path, model_dir):
    """Layer 0 sees each token alone: it cannot know the previous word, so it is near chance;
    the LSTM layers (even with random weights) carry it forward."""
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    train, test = previous_word_tagging(tmp_path)
    report = probe(model, train, test, "tag", "0,1,mix", seeds=1, lr=0.01, epochs=30)
    scores = {k: v["accuracy"]["mean"] for k, v in report["results"].items()}
    assert scores["0"] < 70, scores
    assert scores["1"] > scores["0"] + 20 and scores["mix"] > scores["0"] + 20, scores


def test_same_seed_same_scores(tmp_path, model_dir):
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    train, test = previous_word_tagging(tmp_path, 120, 40)
    first = probe(model, train, test, "tag", "mix,0", seeds=2, epochs=3)
    second = probe(model, train, test, "tag", "mix,0", seeds=2, epochs=3)
    assert first["results"] == second["results"]
    assert first["results"]["0"]["accuracy"]["runs"][0] != first["results"]["mix"]["accuracy"]["runs"][0]


def test_bio_tags_get_span_f1(tmp_path, model_dir):
    train = write(tmp_path / "train.txt", ["the B-NP", "cat I-NP", "runs B-VP", ""] * 30)
    test = write(tmp_path / "test.txt", ["the B-NP", "cat I-NP", "runs B-VP", "", "cat B-NP", ""])
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    report = probe(model, train, test, "tag", "0", seeds=1, lr=0.01, epochs=20)
    assert report["metric"] == "f1" and report["bio"]
    result = report["results"]["0"]
    # Layer 0 tags "cat" the same wherever it stands: I-NP (as in training), so the second sentence's
    # B-NP chunk is found as an I-NP chunk, which conlleval counts as the same chunk (I after O starts one).
    assert result["accuracy"]["mean"] == pytest.approx(75.0)
    assert result["f1"]["mean"] == pytest.approx(100.0)


def test_cli_writes_table_json_and_plot(tmp_path, capsys, model_dir):
    pytest.importorskip("matplotlib")
    train, test = separable_classification(tmp_path, 60, 20)
    rc, out, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                           "--layers", "mix,0,top", "--control", "random", "--seeds", "2", "--epochs", "2",
                           "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"),
                           "--plot", str(tmp_path / "r.png"), capsys=capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["results"]) == ["mix", "0", "top", "random:mix", "random:0", "random:top"]
    for key in ("task", "metric", "model", "train", "test", "seconds"):
        assert key in report
    assert set(report["seconds"]) == {"embed", "heads"}
    assert set(report["results"]["mix"]["accuracy"]) == {"mean", "std", "runs"}
    assert len(report["results"]["random:mix"]["mix_weights"]) == 3
    assert "mix weights (softmax, mean of the seeds): layer 0" in out and "random:mix weights" in out
    assert "dev: 6 sentences of the training file (10%, seed 0)" in out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    rc, _, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                         "--json", str(tmp_path / "r.json"), capsys=capsys)
    assert rc == 1 and "r.json already exists; pass --force" in err


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, model_dir, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    train, test = separable_classification(tmp_path, 20, 5)
    rc, _, err = run_cli("--model", model_dir, "--task", "classify", "--train", train, "--test", test,
                         "--plot", str(tmp_path / "r.png"), capsys=capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "pip install 'bilm[plot]'" in err


def test_a_token_cut_into_pieces_gets_the_mean_of_its_pieces(tmp_path):
    import sentencepiece
    from bilm.core.text import TextPipeline
    from bilm.evaluation.vectors import ModelInputs, embed, model_inputs
    from train_helpers import TRAIN_DATA

    sentencepiece.SentencePieceTrainer.train(input=TRAIN_DATA, model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                             normalization_rule_name="identity", minloglevel=3)
    directory = write_model(tmp_path / "model")
    TextPipeline("sentencepiece", sp_model_proto=(tmp_path / "sp.model").read_bytes()).save(directory)
    model = model_from_files(os.path.join(directory, "options.json"), os.path.join(directory, "weights.hdf5"))
    data = read_tagging(write(tmp_path / "tags.txt", ["neural A", "networks B", "", "models A", "use B", ""]))
    inputs = model_inputs(data, model.pipeline, pretokenized=False)
    assert inputs.n_split >= 3 and len(inputs.pieces[0]) > 2
    vectors = embed(model, inputs, progress=False)
    assert vectors.offsets.tolist() == [0, 2, 4]  # one vector per token of the file
    pieces = embed(model, ModelInputs([inputs.pieces[0]], None), progress=False).layers.astype(np.float32)
    groups = np.asarray(inputs.groups[0])
    for token in (0, 1):
        expected = pieces[groups == token].mean(0)
        assert np.allclose(vectors.layers[token].astype(np.float32), expected, rtol=1e-2, atol=1e-3)
    # --pretokenized: the file's tokens as they are, one piece each.
    assert model_inputs(data, model.pipeline, pretokenized=True).n_split == 0


# ----------------------------------------------------------------------------- the cache

def test_cache_hits_and_misses(tmp_path):
    directory = write_model(tmp_path / "model")
    options, weights = os.path.join(directory, "options.json"), os.path.join(directory, "weights.hdf5")
    train, _ = separable_classification(tmp_path, 20, 5)
    cache = str(tmp_path / "cache")

    def vectors():
        return file_vectors(model_from_files(options, weights), read_classification(train), cache, progress=False)

    first = vectors()
    assert not first.from_cache
    again = vectors()
    assert again.from_cache and np.array_equal(first.layers, again.layers)
    # Another tokenizer (NFKC normalization) beside the options: a miss.
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump({"format": "bilm-tokenizer", "format_version": 1, "tokenizer": "whitespace", "nfkc": True}, f)
    assert not vectors().from_cache
    assert vectors().from_cache
    # --pretokenized splits on whitespace, as the first calls without a tokenizer did: their vectors.
    model = model_from_files(options, weights)
    assert file_vectors(model, read_classification(train), cache, pretokenized=True, progress=False).from_cache
    # Other weights under the same path: a miss, and different vectors.
    write_model(directory, seed=2)
    other = vectors()
    assert not other.from_cache and not np.array_equal(other.layers, first.layers)
    # The file edited (one word of its first line; the same lines): a miss.
    with open(train) as f:
        lines = f.read().split("\n")
    lines[0] = lines[0].replace("\t", "\tcow ", 1)
    with open(train, "w") as f:
        f.write("\n".join(lines))
    assert not vectors().from_cache
    assert vectors().from_cache


def test_a_cache_file_serves_only_its_own_key(tmp_path):
    a, b = write_model(tmp_path / "a", seed=1), write_model(tmp_path / "b", seed=2)
    train, _ = separable_classification(tmp_path, 20, 5)
    data = read_classification(train)
    cache = str(tmp_path / "cache")
    model_a = model_from_files(os.path.join(a, "options.json"), os.path.join(a, "weights.hdf5"))
    model_b = model_from_files(os.path.join(b, "options.json"), os.path.join(b, "weights.hdf5"))
    file_vectors(model_a, data, cache, progress=False)
    # Model a's cache file put where model b's would be: read back, its key does not match, so b embeds.
    os.replace(cache_path(cache, cache_key(model_a, data, False, "fp32")),
               cache_path(cache, cache_key(model_b, data, False, "fp32")))
    assert not file_vectors(model_b, data, cache, progress=False).from_cache


@pytest.mark.parametrize("damage", ["cut", "flipped byte", "wrong shape", "compressed", "npy"])
def test_a_damaged_cache_file_is_embedded_again_and_rewritten(tmp_path, model_dir, damage):
    train, _ = separable_classification(tmp_path, 20, 5)
    data = read_classification(train)
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    cache = str(tmp_path / "cache")
    first = file_vectors(model, data, cache, progress=False)
    key = cache_key(model, data, False, "fp32")
    path = cache_path(cache, key)
    raw = open(path, "rb").read()
    if damage == "cut":
        open(path, "wb").write(raw[:len(raw) // 2])
    elif damage == "flipped byte":  # inside the layers' data: zip's CRC no longer matches
        damaged = bytearray(raw)
        damaged[raw.index(first.layers.tobytes()[:64]) + 10] ^= 0xFF
        open(path, "wb").write(bytes(damaged))
    elif damage == "wrong shape":  # the right key over arrays that do not hold this file's sentences
        np.savez(path, key=np.array(json.dumps(key, sort_keys=True)), layers=first.layers[1:],
                 offsets=first.offsets, n_split=np.array(0))
    elif damage == "compressed":  # not as bilm writes it: a deflated member could expand without bound
        np.savez_compressed(path, key=np.array(json.dumps(key, sort_keys=True)), layers=first.layers,
                            offsets=first.offsets, n_split=np.array(0))
    else:
        np.save(open(path, "wb"), first.layers)
    again = file_vectors(model, data, cache, progress=False)
    assert not again.from_cache and np.array_equal(again.layers, first.layers)
    assert file_vectors(model, data, cache, progress=False).from_cache  # rewritten whole


def test_settings_seeds_and_heads_share_one_embedding_pass(tmp_path, model_dir):
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    train, test = separable_classification(tmp_path, 40, 10)
    cache = str(tmp_path / "cache")
    assert probe(model, train, test, "classify", "mix", cache=cache, seeds=1, epochs=1)["cache_hits"] == 0
    again = probe(model, train, test, "classify", "0,1,average", cache=cache, seeds=2, epochs=1, head="cnn")
    assert again["cache_hits"] == 2  # train and test files


# ----------------------------------------------------------------------------- the random control

def test_random_control_is_the_initialization_of_a_training_run(model_dir):
    from bilm.runs.model_builder import build_model
    from bilm.training.step import seed_everything
    from train_helpers import tiny_config

    cfg = tiny_config("train.seed=5")
    seed_everything(5)
    trained_start = build_model(cfg, vocab_size=50).bilm
    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    model.bilm.options = cfg.model
    model.random_seed = 5
    control = random_control(model)
    start = trained_start.state_dict()
    assert set(control.bilm.state_dict()) == set(start)
    for name, value in control.bilm.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_random_control_is_keyed_by_its_weights(model_dir):
    """The control's cache key holds the sha256 of the weights built, not only the seed: the same
    seed under another torch or bilm may build other weights, whose vectors differ."""
    from bilm.evaluation.vectors import weights_sha256

    model = model_from_files(os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5"))
    control = random_control(model)
    assert random_control(model).identity == control.identity  # built again: the same key, a cache hit
    assert control.identity["weights_sha256"] == weights_sha256(control.bilm)
    with torch.no_grad():
        next(control.bilm.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(control.bilm) != control.identity["weights_sha256"]


# ----------------------------------------------------------------------------- across a run

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from bilm.training.run import train
    from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config

    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config("train.max_steps=30", "train.checkpoint_every_steps=10", "train.eval_every_steps=10",
                      "train.keep_checkpoints=2", "train.eval_tokens=400", "train.seed=3")
    train(cfg, TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False, eval_data=TRAIN_DATA)
    return str(run)


def test_every_checkpoint_probes_each_beside_its_logged_perplexity(small_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bilm.evaluation.across_run import logged_perplexity

    train, test = previous_word_tagging(tmp_path, 60, 20)
    rc, out, err = run_cli("--checkpoint", small_run, "--every-checkpoint", "--task", "tag", "--train", train,
                           "--test", test, "--layers", "mix,0", "--control", "random", "--seeds", "2", "--epochs", "2",
                           "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "run.json"),
                           "--plot", str(tmp_path / "run.png"), capsys=capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "run.json").read_text())
    rows = report["checkpoints"]
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps) and {20, 30} <= set(steps)  # the two kept; best.pt shares a row or has its own
    assert sum(row["best"] for row in rows) == 1
    best = next(row for row in rows if row["best"])
    assert best["name"] == "best.pt" or best["step"] in (20, 30)
    logged = logged_perplexity(small_run)
    for row in rows:
        assert row["heldout_perplexity"] == logged[row["step"]]
        assert list(row["results"]) == ["mix", "0"]
    assert list(report["control"]) == ["random:mix", "random:0"]  # probed once: the same for every step
    choice = report["choice"]
    chosen = next(row for row in rows if row["name"] == choice["checkpoint"])
    assert choice["dev"] == max(r["dev"]["mean"] for row in rows for r in row["results"].values())
    assert chosen["results"][choice["setting"]]["dev"]["mean"] == choice["dev"]
    assert f"export it with: bilm export --checkpoint {choice['path']}" in out
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_logged_perplexity_of_a_diverged_or_damaged_log_and_its_json(tmp_path):
    from bilm.evaluation.across_run import logged_perplexity
    from bilm.evaluation.report import write_json

    lines = ['{"step": 10, "heldout_perplexity/average": 300.5}',
             '{"step": 20, "heldout_perplexity/average": "inf"}',  # a diverged heldout check (json_safe)
             '{"step": 30, "heldout_perplexity/average": "lots"}', '{"step": null, "heldout_perplexity/average": 1}',
             '{"step": 1e400, "heldout_perplexity/average": 1}', '[1, 2]', '{"event": "divergence"}',
             '{"step": 40, "heldout_perplex']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert logged_perplexity(str(tmp_path)) == {10: 300.5, 20: float("inf")}
    write_json(str(tmp_path / "r.json"), {"checkpoints": [{"step": 20, "heldout_perplexity": float("inf")}]})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert report["checkpoints"][0]["heldout_perplexity"] == "inf"


def test_checkpoint_and_best_of_a_run(small_run, tmp_path, capsys):
    from bilm.evaluation.vectors import model_from_checkpoint
    from bilm.runs.checkpoint import load_checkpoint

    newest, best = model_from_checkpoint(small_run), model_from_checkpoint(small_run, best=True)
    assert newest.description.endswith("step-00000030.pt")
    assert best.description.endswith("best.pt") and best.random_seed == 3  # the run's train.seed
    assert load_checkpoint(best.description, mmap=True)["step"] in (10, 20, 30)
    train, test = previous_word_tagging(tmp_path, 40, 10)
    rc, out, err = run_cli("--checkpoint", small_run, "--best", "--task", "tag", "--train", train, "--test", test,
                           "--seeds", "1", "--epochs", "1", "--no-cache", capsys=capsys)
    assert rc == 0, err
    assert "best.pt" in out
    rc, _, err = run_cli("--checkpoint", small_run, "--model", "x", "--task", "tag", "--train", train, "--test", test,
                         capsys=capsys)
    assert rc == 1 and "one model" in err
