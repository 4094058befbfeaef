"""The one options schema: options.json and a config's model: section read the same way."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import yaml

from bilm.core.chars import DEFAULT_MAX_CHARACTERS, N_CHARACTERS
from bilm.runs.config import ConfigError, config_from_dict, config_to_dict, load_config
from bilm.core.options import BiLMOptions, CharCNNOptions, LstmOptions, OptionsError
from conftest import OPTIONS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PUBLISHED = sorted(glob.glob(os.path.join(FIXTURES, "**", "options.json"), recursive=True))
MODEL_KEYS = ("lstm", "char_cnn", "n_tokens_vocab")

LSTM = {"dim": 16, "projection_dim": 8, "n_layers": 2}
CNN = {"embedding": {"dim": 4}, "filters": [[1, 4], [2, 8]]}

# options.json keys that may be missing, and what each then means (bilm-tf's reading).
MISSING_DEFAULTS = [
    (("lstm", "cell_clip"), lambda o: o.lstm.cell_clip, None),
    (("lstm", "proj_clip"), lambda o: o.lstm.proj_clip, None),
    (("lstm", "use_skip_connections"), lambda o: o.lstm.use_skip_connections, False),
    (("char_cnn", "n_highway"), lambda o: o.char_cnn.n_highway, 0),
    (("char_cnn", "activation"), lambda o: o.char_cnn.activation, "relu"),
    (("char_cnn", "max_characters_per_token"), lambda o: o.char_cnn.max_characters_per_token, DEFAULT_MAX_CHARACTERS),
    (("char_cnn", "n_characters"), lambda o: o.char_cnn.n_characters, N_CHARACTERS),
    (("char_cnn",), lambda o: o.char_cnn, None),
    (("n_tokens_vocab",), lambda o: o.n_tokens_vocab, None),
]
REQUIRED = [("lstm",), ("lstm", "dim"), ("lstm", "projection_dim"), ("lstm", "n_layers"),
            ("char_cnn", "embedding"), ("char_cnn", "embedding", "dim"), ("char_cnn", "filters")]


def _full() -> dict:
    return {"lstm": {**LSTM, "cell_clip": 3, "proj_clip": 2.5, "use_skip_connections": True},
            "char_cnn": {**CNN, "n_highway": 1, "activation": "tanh", "max_characters_per_token": 20,
                         "n_characters": 261},
            "n_tokens_vocab": 33}


def _without(d: dict, path: tuple) -> dict:
    d = copy.deepcopy(d)
    node = d
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return d


def _as_yaml_model(tmp_path, model: dict) -> BiLMOptions:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": model}), encoding="utf-8")
    return load_config(path).model


def _as_options_json(tmp_path, model: dict) -> BiLMOptions:
    path = tmp_path / "options.json"
    path.write_text(json.dumps(model), encoding="utf-8")
    return BiLMOptions.from_file(str(path))


@pytest.mark.parametrize("name", [os.path.relpath(p, FIXTURES) for p in PUBLISHED])
def test_published_file_and_yaml_model_section_agree(name, tmp_path):
    with open(os.path.join(FIXTURES, name)) as f:
        raw = json.load(f)
    model = {k: raw[k] for k in MODEL_KEYS if k in raw}  # the config refuses bilm-tf's training keys
    from_json = BiLMOptions.from_file(os.path.join(FIXTURES, name))
    assert _as_yaml_model(tmp_path, model) == from_json
    assert config_from_dict({"model": model}).model == from_json


@pytest.mark.parametrize("missing", [None] + [path for path, _, _ in MISSING_DEFAULTS],
                         ids=lambda p: "full" if p is None else ".".join(p))
def test_same_dict_same_options_either_way(missing, tmp_path):
    model = _full() if missing is None else _without(_full(), missing)
    from_json = _as_options_json(tmp_path, model)
    assert _as_yaml_model(tmp_path, model) == from_json
    assert BiLMOptions.from_dict(model) == from_json


@pytest.mark.parametrize("path,get,default", MISSING_DEFAULTS, ids=[".".join(p) for p, _, _ in MISSING_DEFAULTS])
def test_missing_key_takes_its_documented_default(path, get, default):
    assert get(BiLMOptions.from_dict(_full())) != default  # the full dict says otherwise
    assert get(BiLMOptions.from_dict(_without(_full(), path))) == default


@pytest.mark.parametrize("path", REQUIRED, ids=[".".join(p) for p in REQUIRED])
def test_missing_required_key_is_named(path):
    section = ".".join(("options", *path[:-1]))
    with pytest.raises(OptionsError) as e:
        BiLMOptions.from_dict(_without(_full(), path))
    assert str(e.value) == f"{section}: missing key '{path[-1]}'"


def test_dataclass_defaults_are_the_missing_key_defaults():
    parsed = BiLMOptions.from_dict({"lstm": LSTM, "char_cnn": CNN})
    built = BiLMOptions(lstm=LstmOptions(**LSTM), char_cnn=CharCNNOptions(embedding_dim=4, filters=[[1, 4], [2, 8]]))
    assert parsed == built
    assert BiLMOptions.from_dict({"lstm": LSTM}) == BiLMOptions(lstm=LstmOptions(**LSTM))


def test_zero_or_null_clip_is_no_clip_and_written_as_zero():
    for clip in (0, -1, None):
        options = BiLMOptions.from_dict({"lstm": {**LSTM, "cell_clip": clip, "proj_clip": clip}})
        assert options.lstm.cell_clip is None and options.lstm.proj_clip is None
        assert options.to_dict()["lstm"]["cell_clip"] == 0 and options.to_dict()["lstm"]["proj_clip"] == 0


def test_to_dict_bytes():
    """Key order, ints kept as ints, n_characters 262: the bytes export writes."""
    text = json.dumps(BiLMOptions.from_file(OPTIONS).to_dict())
    assert text == ('{"lstm": {"dim": 64, "projection_dim": 16, "n_layers": 2, "cell_clip": 3, "proj_clip": 3, '
                    '"use_skip_connections": false}, "char_cnn": {"embedding": {"dim": 4}, "filters": [[1, 4], '
                    '[2, 8], [3, 16], [4, 32], [5, 64]], "n_highway": 2, "activation": "relu", '
                    '"max_characters_per_token": 50, "n_characters": 262}}')
    word = BiLMOptions.from_dict({"lstm": {**LSTM, "cell_clip": 1.5}, "n_tokens_vocab": 7})
    assert json.dumps(word.to_dict()) == ('{"lstm": {"dim": 16, "projection_dim": 8, "n_layers": 2, "cell_clip": 1.5, '
                                          '"proj_clip": 0, "use_skip_connections": false}, "n_tokens_vocab": 7}')


def test_config_keeps_n_characters_the_published_file_says_262():
    cfg = config_from_dict({"model": _full()})
    assert cfg.model.char_cnn.n_characters == 261
    assert config_to_dict(cfg)["model"]["char_cnn"]["n_characters"] == 261
    assert cfg.model.to_dict()["char_cnn"]["n_characters"] == 262


def test_unknown_keys_ignored_in_options_json_refused_in_config(tmp_path):
    model = _full()
    model["lstm"]["n_layer"] = 2
    assert BiLMOptions.from_dict(model) == BiLMOptions.from_dict(_full())
    with pytest.raises(ConfigError, match=r"unknown key 'model\.lstm\.n_layer' \(did you mean 'n_layers'\?\)"):
        _as_yaml_model(tmp_path, model)


def test_bad_model_value_in_yaml_names_file_line_and_dotted_key(tmp_path):
    path = tmp_path / "x.yaml"
    text = ("model:\n"
            "  lstm: {dim: 32, projection_dim: 8, n_layers: 1}\n"
            "  char_cnn:\n"
            "    embedding:\n"
            "      dim: 4\n"
            "    filters: [[1, 4]]\n"
            "    n_highway: {n_highway}\n")
    path.write_text(text.replace("{n_highway}", "two"), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:7: model.char_cnn: key 'n_highway' must be int, got str ('two')"
    path.write_text(text.replace("{n_highway}", "-1"), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:7: model.char_cnn: key 'n_highway' must be >= 0, got -1"
    path.write_text(text.replace("{n_highway}", "1").replace("dim: 4", "dim: 0"), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:5: model.char_cnn.embedding: key 'dim' must be >= 1, got 0"
    path.write_text(text.replace("{n_highway}", "1").replace("dim: 4", "dims: 4"), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:5: unknown key 'model.char_cnn.embedding.dims' (did you mean 'dim'?)"


def test_numeric_string_is_a_number_in_yaml_only(tmp_path):
    """PyYAML reads 1e-1 as a string; every config section takes it as the number. options.json is JSON: no."""
    model = {"lstm": {**LSTM, "cell_clip": "1e-1"}}
    assert _as_yaml_model(tmp_path, model).lstm.cell_clip == 0.1
    with pytest.raises(OptionsError, match=r"options\.lstm: key 'cell_clip' must be int or float, got str \('1e-1'\)"):
        BiLMOptions.from_dict(model)
