"""bilm embed --dtype float16 / embed_file(dtype=): half the file, float32's values rounded."""
import json

import h5py
import numpy as np
import pytest

from bilm import ElmoEmbedder
from bilm.cli import main as bilm_main
from conftest import OPTIONS, WEIGHTS


def test_float16_file_records_dtype_and_rounds_float32(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("The cat sat on the mat .\nA dog\n\nnaïve 中文 tokens\n", encoding="utf-8")
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    for dtype in ("float32", "float16"):
        assert embedder.embed_file(str(text), str(tmp_path / f"{dtype}.hdf5"), dtype=dtype, progress=False) == 4
    with h5py.File(tmp_path / "float32.hdf5") as full, h5py.File(tmp_path / "float16.hdf5") as half:
        assert full.attrs["dtype"] == "float32" and half.attrs["dtype"] == "float16"
        assert json.loads(half["sentence_to_index"][0]) == json.loads(full["sentence_to_index"][0])
        for key in ("0", "1", "2", "3"):
            assert half[key].dtype == np.float16 and full[key].dtype == np.float32
            assert half[key].attrs["tokens"] == full[key].attrs["tokens"]
            # Exactly float32's values rounded to the nearest float16.
            np.testing.assert_array_equal(half[key][...], full[key][...].astype(np.float16))
            assert np.abs(half[key][...].astype(np.float32) - full[key][...]).max(initial=0) <= \
                np.abs(full[key][...]).max(initial=0) * 2.0 ** -11
    with pytest.raises(ValueError, match="dtype must be one of"):
        embedder.embed_file(str(text), str(tmp_path / "x.hdf5"), dtype="int8", progress=False)


def test_command_dtype_and_layers(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("The cat sat .\n", encoding="utf-8")
    out = tmp_path / "top16.hdf5"
    assert bilm_main(["embed", "--options", OPTIONS, "--weights", WEIGHTS, "--input", str(text), "--out", str(out),
                      "--stateless", "--layers", "top", "--dtype", "float16"]) == 0
    with h5py.File(out) as f:
        assert f["0"].dtype == np.float16 and f["0"].shape == (4, 32) and f.attrs["dtype"] == "float16"
