import numpy as np
import pytest

from bilm.core.vocab import Vocabulary, VocabularyError


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


def test_bytes_that_are_not_utf8_are_named_by_line_far_into_a_file(tmp_path):
    """A text-mode reader decodes in chunks, so its error's offset is within a chunk: the
    message must name the line of the bad bytes, here well past the first chunk."""
    from bilm.runs.config import ConfigError, load_config
    from bilm.core.errors import read_json

    words = [f"word{i}" for i in range(5000)]
    raw = ("<S>\n</S>\n<UNK>\n" + "\n".join(words[:2999]) + "\n").encode() + "caf\xe9\n".encode("latin-1")
    path = tmp_path / "vocab.txt"
    path.write_bytes(raw + "\n".join(words[3000:]).encode() + b"\n")
    with pytest.raises(VocabularyError, match=r"vocab\.txt, line 3003: not UTF-8 text \(byte 4 of the line"):
        Vocabulary.from_file(str(path))
    config = tmp_path / "c.yaml"
    config.write_bytes(b"# comment\n" * 2000 + b"train:\n  seed: \xff\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 2002: not UTF-8 text \(byte 9 of the line"):
        load_config(config)
    options = tmp_path / "options.json"
    options.write_bytes(b'{\n"a": "\xc3"\n}\n')
    with pytest.raises(ValueError, match=r"options\.json, line 2: not UTF-8 text \(byte 7 of the line"):
        read_json(str(options))


def test_json_nested_deeper_than_the_parser_recurses_is_one_error_naming_the_file(tmp_path):
    """tokenizer.json, options.json, a manifest: files people hand each other, read by read_json."""
    from bilm.core.errors import InputError, read_json

    path = tmp_path / "tokenizer.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match=r"tokenizer\.json: not valid JSON \(nested too deeply\)"):
        read_json(str(path))
