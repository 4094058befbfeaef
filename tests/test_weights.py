import json

import h5py
import numpy as np
import pytest
import torch

from bilm.modules.bidirectional import BidirectionalLM
from bilm.core.options import BiLMOptions, OptionsError
from bilm.formats.weights import WeightFileError
from bilm.modules.weight_file import load_bilm, load_weights, save_weights
from conftest import OPTIONS, WEIGHTS


def test_save_then_load_is_bit_identical(tmp_path):
    model = load_bilm(OPTIONS, WEIGHTS)
    out = str(tmp_path / "w.hdf5")
    save_weights(model, out)
    with h5py.File(WEIGHTS) as a, h5py.File(out) as b:
        names = []
        a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
        assert b["char_embed"].shape == (261, 4)


def test_word_input_round_trip(tmp_path):
    options = BiLMOptions.from_dict({"lstm": {"dim": 8, "projection_dim": 4, "n_layers": 1}, "n_tokens_vocab": 10})
    model = BidirectionalLM(options)
    out = str(tmp_path / "w.hdf5")
    save_weights(model, out)
    (tmp_path / "o.json").write_text(json.dumps({"lstm": options.lstm.to_dict()}))
    loaded = load_bilm(str(tmp_path / "o.json"), out)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_dataset_and_shape_errors(tmp_path):
    broken = str(tmp_path / "broken.hdf5")
    with h5py.File(WEIGHTS) as src, h5py.File(broken, "w") as dst:
        for name in ("char_embed", "CNN"):
            src.copy(name, dst)
    model = BidirectionalLM(BiLMOptions.from_file(OPTIONS))
    with pytest.raises(WeightFileError, match=r"broken.hdf5: missing dataset 'CNN_high_0/W_carry'"):
        load_weights(model, broken)
    with h5py.File(broken, "a") as f:
        del f["char_embed"]
        f.create_dataset("char_embed", data=np.zeros((261, 5), np.float32))
    with pytest.raises(WeightFileError, match=r"'char_embed' has shape \(261, 5\), the options imply \(261, 4\)"):
        load_weights(model, broken)


def test_options_errors_name_the_key(tmp_path):
    with open(OPTIONS) as f:
        options = json.load(f)
    del options["lstm"]["projection_dim"]
    with pytest.raises(OptionsError, match="missing key 'projection_dim'"):
        BiLMOptions.from_dict(options)
    options["lstm"]["projection_dim"] = "16"
    with pytest.raises(OptionsError, match="key 'projection_dim' must be int, got str"):
        BiLMOptions.from_dict(options)
    bad = tmp_path / "options.json"
    bad.write_text("{not json")
    with pytest.raises(OptionsError, match="options.json: not valid JSON"):
        BiLMOptions.from_file(str(bad))


def test_options_round_trip():
    with open(OPTIONS) as f:
        raw = json.load(f)
    assert BiLMOptions.from_dict(raw).to_dict() == raw
