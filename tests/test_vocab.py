import numpy as np
import pytest

from bilm.vocab import Vocabulary, VocabularyError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_from_file_ids_and_encode(tmp_path):
    vocab = Vocabulary.from_file(write(tmp_path / "vocab.txt", "<S>\n</S>\n<UNK>\nthe\ncat\n"))
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert len(vocab) == 5
    assert vocab.tokens == ["<S>", "</S>", "<UNK>", "the", "cat"]
    assert vocab.token_to_id["cat"] == 4
    ids = vocab.encode(["the", "dog", "cat", "<S>"])
    assert ids.dtype == np.int64
    assert ids.tolist() == [3, 2, 4, 0]
    assert vocab.encode([]).shape == (0,)
    assert vocab.decode([3, 4]) == ["the", "cat"]


def test_counts_column_and_trailing_blank_lines_are_accepted(tmp_path):
    vocab = Vocabulary.from_file(write(tmp_path / "v.tsv", "<S>\t9\n</S>\t9\n<UNK>\t0\nthe\t5\n\n"))
    assert vocab.tokens == ["<S>", "</S>", "<UNK>", "the"]


@pytest.mark.parametrize("text, line, words", [
    ("the\n<S>\n</S>\n<UNK>\n", 1, "'<S>'"),
    ("<S>\n<UNK>\n</S>\n", 2, "'</S>'"),
    ("<S>\n</S>\n", 3, "end of file"),
    ("<S>\n</S>\n<UNK>\nthe\nthe\n", 5, "duplicate"),
    ("<S>\n</S>\n<UNK>\n\nthe\n", 4, "empty line"),
    ("<S>\n</S>\n<UNK>\nthe cat\n", 4, "whitespace"),
])
def test_errors_name_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path / "bad_vocab.txt", text)
    with pytest.raises(VocabularyError) as error:
        Vocabulary.from_file(path)
    message = str(error.value)
    assert path in message and f"line {line}" in message and words in message
