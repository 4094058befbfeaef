import numpy as np
import pytest

from bilm.core.chars import CharIdMapper, char_id_table, token_to_char_ids


def test_token_ids_follow_the_published_convention():
    ids = token_to_char_ids("ab")
    assert ids[:4].tolist() == [259, 98, 99, 260]  # bow, 'a', 'b', eow, shifted by +1
    assert (ids[4:] == 261).all()  # padding char 260, shifted
    assert token_to_char_ids("<S>")[:4].tolist() == [259, 257, 260, 261]
    assert token_to_char_ids("</S>")[:4].tolist() == [259, 258, 260, 261]


def test_multibyte_and_truncation():
    ids = token_to_char_ids("é中")
    assert ids[1:6].tolist() == [b + 1 for b in "é中".encode("utf-8")]
    long_ids = token_to_char_ids("y" * 70)
    assert (long_ids[1:49] == ord("y") + 1).all() and long_ids[49] == 260  # 48 bytes then eow


def test_batch_pads_with_zero_and_adds_boundaries():
    mapper = CharIdMapper()
    batch = mapper.batch([["a", "bc"], []])
    assert batch.shape == (2, 4, 50)
    assert batch[0, 0, 1] == 257 and batch[0, 3, 1] == 258
    assert batch[1, 1, 1] == 258 and (batch[1, 2:] == 0).all()
    np.testing.assert_array_equal(batch[0, 2], token_to_char_ids("bc"))


def test_cache_grows_and_preloads(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("<S>\n</S>\n<UNK>\nthe\t10\n", encoding="utf-8")
    mapper = CharIdMapper.from_vocab_file(str(vocab))
    assert len(mapper) == 4  # <S>, </S>, <UNK>, the
    many = [f"w{i}" for i in range(3000)]
    batch = mapper.batch([many])
    assert len(mapper) == 3004
    np.testing.assert_array_equal(batch[0, 2999], token_to_char_ids("w2998"))


def test_type_errors_name_the_position():
    with pytest.raises(TypeError, match="sentence 0, token 1 is a NoneType"):
        CharIdMapper().batch([["a", None]])


def test_char_id_table_matches_token_to_char_ids():
    tokens = ["a", "<S>", "</S>", "<UNK>", "é中", "x" * 60, "ab" + "é" * 30, "\ufffd", "Ω≈ç√"]
    for width in (5, 8, 50):
        expected = np.stack([token_to_char_ids(t, width) for t in tokens])
        assert np.array_equal(char_id_table(tokens, width), expected)


def test_preloaded_mapper_rows_equal_computed_rows():
    tokens = ["the", "é中", "the", "<S>", "x" * 70, "</S>", "a"]  # repeats and specials in the preload
    preloaded = CharIdMapper(50, tokens)
    assert len(preloaded) == 6  # <S>, </S>, the, é中, x*70, a: each once
    sentences = [["the", "a", "é中"], ["x" * 70, "new"]]
    assert np.array_equal(preloaded.batch(sentences), CharIdMapper(50).batch(sentences))
