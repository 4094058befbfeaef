"""Config loading: presets, typed overrides, errors that name the file and the key, exact round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bilm.runs.config import (Config, ConfigError, OptimConfig, TrainConfig, config_from_dict, config_to_dict,
                                  load_config, save_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["elmo_original", "elmo_medium", "elmo_small", "tiny"]


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """\
model:
  lstm: {dim: 32, projection_dim: 8, n_layers: 1}
train:
  batch_size: 4
"""


# ----- presets -----

@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_satisfies_allennlp_loader(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    lstm, cnn = cfg.model.lstm, cfg.model.char_cnn
    assert cnn is not None
    # What AllenNLP's ELMo loader needs from options.json.
    assert lstm.use_skip_connections is True
    assert cnn.n_filters != lstm.projection_dim
    assert lstm.dim != lstm.projection_dim
    assert cnn.max_characters_per_token == 50
    assert lstm.n_layers == 2 and lstm.cell_clip == 3 and lstm.proj_clip == 3
    assert cfg.optim == OptimConfig()  # bilm-tf's optimizer settings everywhere


def test_elmo_original_is_bilm_tf():
    cfg = load_config(CONFIGS / "elmo_original.yaml")
    lstm, cnn, train = cfg.model.lstm, cfg.model.char_cnn, cfg.train
    assert (lstm.dim, lstm.projection_dim, lstm.n_layers) == (4096, 512, 2)
    assert (lstm.cell_clip, lstm.proj_clip, lstm.use_skip_connections) == (3, 3, True)
    assert cnn.embedding_dim == 16
    assert cnn.filters == [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]
    assert (cnn.n_highway, cnn.activation, cnn.max_characters_per_token) == (2, "relu", 50)
    assert (train.batch_size, train.unroll_steps, train.n_epochs) == (128, 20, 10)
    assert (train.n_negative_samples_batch, train.dropout) == (8192, 0.1)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.initial_accumulator_value, cfg.optim.max_grad_norm) == \
        ("adagrad", 0.2, 1.0, 10.0)
    # Every train field is written in the preset, so a reader sees all the knobs.
    text = (CONFIGS / "elmo_original.yaml").read_text()
    for key in TrainConfig.__dataclass_fields__:
        assert f"\n  {key}:" in text


@pytest.mark.parametrize("name,sizes", [
    ("elmo_medium", (2048, 256, 1024, 2)),
    ("elmo_small", (1024, 128, 512, 1)),
    ("tiny", (64, 16, 120, 1)),
])
def test_smaller_presets_have_their_sizes(name, sizes):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    got = (cfg.model.lstm.dim, cfg.model.lstm.projection_dim, cfg.model.char_cnn.n_filters, cfg.model.char_cnn.n_highway)
    assert got == sizes


def test_tiny_is_small_enough_for_tests():
    train = load_config(CONFIGS / "tiny.yaml").train
    assert (train.batch_size, train.unroll_steps, train.n_negative_samples_batch) == (16, 10, 256)


# ----- overrides -----

def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", [
        "train.batch_size=64", "optim.lr=1", "train.precision=bf16", "model.lstm.dim=128",
        "train.max_steps=7", "optim.adam_betas=[0.8, 0.9]", "train.deepspeed_config=configs/deepspeed/z2.json",
        "train.sparse_softmax=false", "optim.adam_eps=1e-6", "train.device=cpu",
    ])
    assert cfg.train.batch_size == 64 and type(cfg.train.batch_size) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.train.precision == "bf16"
    assert cfg.model.lstm.dim == 128
    assert cfg.train.max_steps == 7
    assert cfg.optim.adam_betas == (0.8, 0.9)
    assert cfg.train.deepspeed_config == "configs/deepspeed/z2.json"
    assert cfg.train.sparse_softmax is False and cfg.train.device == "cpu"
    assert cfg.optim.adam_eps == 1e-6  # PyYAML reads "1e-6" as a string; still a number here


def test_override_to_word_inputs_and_missing_sections(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.char_cnn=null"])
    assert cfg.model.char_cnn is None
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.name=adam"])
    assert cfg.optim.name == "adam" and cfg.train.batch_size == 4
    assert cfg.train.unroll_steps == TrainConfig().unroll_steps  # defaults fill the rest


def test_later_override_wins():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


# ----- errors -----

def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL.replace("batch_size", "bach_size"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:4: unknown key 'train.bach_size' (did you mean 'batch_size'?)"


def test_unknown_key_in_override_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["train.bach_size=3"])
    message = str(e.value)
    assert "tiny.yaml" in message and "--set train.bach_size=3" in message
    assert "unknown key 'train.bach_size' (did you mean 'batch_size'?)" in message


def test_unknown_key_in_model_section(tmp_path):
    path = write(tmp_path, MINIMAL.replace("n_layers", "n_layer"))
    with pytest.raises(ConfigError, match=r"x\.yaml:2: unknown key 'model\.lstm\.n_layer' \(did you mean 'n_layers'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.char_cnn\.embedding\.size'"):
        load_config(CONFIGS / "tiny.yaml", ["model.char_cnn.embedding.size=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, MINIMAL + "trian: {}\n"))


@pytest.mark.parametrize("override, expected", [
    ("train.lr=0.1", "unknown key 'train.lr' (did you mean 'optim.lr'?)"),
    # an exact name in another section beats a near one in this section ('warmup_steps')
    ("optim.max_steps=5", "unknown key 'optim.max_steps' (did you mean 'train.max_steps'?)"),
    ("train.cell_clip=3", "unknown key 'train.cell_clip' (did you mean 'model.lstm.cell_clip'?)"),
    ("train.projection_dim=8", "unknown key 'train.projection_dim' (did you mean 'model.lstm.projection_dim'?)"),
    # keys as the file spells them (the char CNN's embedding_dim field is the key embedding.dim)
    ("train.dim=8", "unknown key 'train.dim' (did you mean 'model.lstm.dim' or 'model.char_cnn.embedding.dim'?)"),
])
def test_a_key_given_in_the_wrong_section_names_the_right_one(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert str(e.value).endswith(expected), str(e.value)


def test_an_unknown_key_like_nothing_gets_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["train.zzz=1"])
    assert str(e.value).endswith("unknown key 'train.zzz'")


def test_wrong_type_names_key_expected_and_got(tmp_path):
    path = write(tmp_path, MINIMAL.replace("batch_size: 4", "batch_size: four"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:4: key 'train.batch_size' must be an integer, got str 'four'"
    with pytest.raises(ConfigError, match=r"--set train\.dropout=high: key 'train\.dropout' must be a number, got str 'high'"):
        load_config(CONFIGS / "tiny.yaml", ["train.dropout=high"])
    with pytest.raises(ConfigError, match=r"key 'train\.batch_size' must be an integer, got float 6\.5"):
        load_config(CONFIGS / "tiny.yaml", ["train.batch_size=6.5"])
    with pytest.raises(ConfigError, match=r"key 'train\.sparse_softmax' must be true or false, got int 1"):
        load_config(CONFIGS / "tiny.yaml", ["train.sparse_softmax=1"])
    with pytest.raises(ConfigError, match=r"key 'train\.precision' must be one of 'fp32', 'bf16', got 'fp16'"):
        load_config(CONFIGS / "tiny.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"key 'optim\.adam_betas' must be a list of 2 numbers"):
        load_config(CONFIGS / "tiny.yaml", ["optim.adam_betas=0.9"])


def test_model_errors_name_file_line_and_key(tmp_path):
    path = write(tmp_path, MINIMAL.replace("dim: 32", "dim: big"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:2: model.lstm: key 'dim' must be int")
    with pytest.raises(ConfigError, match=r"tiny\.yaml: --set model\.lstm\.projection_dim=999: .*'projection_dim'"):
        load_config(CONFIGS / "tiny.yaml", ["model.lstm.projection_dim=999"])
    with pytest.raises(ConfigError, match=r"x\.yaml: missing section 'model'"):
        load_config(write(tmp_path, "train: {batch_size: 3}\n"))


def test_bad_values_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'train\.batch_size' must be > 0, got 0"):
        load_config(CONFIGS / "tiny.yaml", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"key 'train\.dropout' must be in \[0, 1\)"):
        load_config(CONFIGS / "tiny.yaml", ["train.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"key 'train\.lstm_impl' must be one of 'fused', 'reference', 'cudnn', got 'fast'"):
        load_config(CONFIGS / "tiny.yaml", ["train.lstm_impl=fast"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(CONFIGS / "tiny.yaml", ["train.batch_size"])
    with pytest.raises(ConfigError, match=r"cannot set 'optim\.lr\.x'"):
        load_config(CONFIGS / "tiny.yaml", ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"x\.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_lstm_compile_key(tmp_path):
    """auto by default; YAML reads a bare on/off as a boolean, which means the mode it spells."""
    assert load_config(CONFIGS / "tiny.yaml").train.lstm_compile == "auto"
    for text, mode in (("on", "on"), ("off", "off"), ("'off'", "off"), ("auto", "auto"), ("true", "on")):
        assert load_config(CONFIGS / "tiny.yaml", [f"train.lstm_compile={text}"]).train.lstm_compile == mode
    text = (CONFIGS / "tiny.yaml").read_text(encoding="utf-8")
    cfg = load_config(write(tmp_path, text.replace("  lstm_compile: auto", "  lstm_compile: off")))
    assert cfg.train.lstm_compile == "off"
    assert config_from_dict(config_to_dict(cfg)).train.lstm_compile == "off"
    with pytest.raises(ConfigError, match=r"key 'train\.lstm_compile' must be one of 'auto', 'on', 'off', got 'sometimes'"):
        load_config(CONFIGS / "tiny.yaml", ["train.lstm_compile=sometimes"])


# ----- round trips -----

@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_dict_json_and_yaml(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["optim.adam_betas=[0.8, 0.95]", "train.max_steps=3"])
    plain = config_to_dict(cfg)
    assert json.loads(json.dumps(plain)) == plain  # plain types only
    assert config_from_dict(plain) == cfg
    assert config_from_dict(json.loads(json.dumps(plain))) == cfg
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_round_trip_keeps_unusual_model_values(tmp_path):
    text = """\
model:
  lstm: {dim: 32, projection_dim: 8, n_layers: 1, cell_clip: 0, proj_clip: 2.5}
  char_cnn: {embedding: {dim: 4}, filters: [[1, 4]], n_characters: 261}
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.lstm.cell_clip is None and cfg.model.char_cnn.n_characters == 261
    assert config_from_dict(config_to_dict(cfg)) == cfg
    word = load_config(write(tmp_path, MINIMAL.replace("model:\n", "model:\n  n_tokens_vocab: 1000\n")))
    assert word.model.char_cnn is None and word.model.n_tokens_vocab == 1000
    assert config_from_dict(config_to_dict(word)) == word


def test_config_from_dict_checks_like_the_loader():
    plain = config_to_dict(load_config(CONFIGS / "tiny.yaml"))
    plain["train"]["unroll"] = 5
    with pytest.raises(ConfigError, match=r"^checkpoint: unknown key 'train\.unroll' \(did you mean 'unroll_steps'\?\)"):
        config_from_dict(plain, where="checkpoint")
    assert isinstance(config_from_dict({"model": plain["model"]}), Config)


def test_exact_the_former_name_of_the_fused_lstm_is_still_read(tmp_path):
    from bilm.modules.lstm import LstmStack
    from bilm.core.options import LstmOptions

    assert load_config(CONFIGS / "tiny.yaml").train.lstm_impl == "fused"
    assert load_config(CONFIGS / "tiny.yaml", ["train.lstm_impl=exact"]).train.lstm_impl == "fused"
    old = config_to_dict(load_config(CONFIGS / "tiny.yaml"))
    old["train"]["lstm_impl"] = "exact"  # as a checkpoint written before the rename holds it
    assert config_from_dict(old).train.lstm_impl == "fused"
    stack = LstmStack(4, LstmOptions(dim=8, projection_dim=4, n_layers=1), impl="exact")
    assert stack.impl == "fused" and stack.layers[0].impl == "fused"


def test_recipe_laid_over_a_preset(tmp_path):
    """Several config files: a later one changes only its own keys; mappings merge, --set comes last."""
    cfg = load_config([CONFIGS / "elmo_small.yaml", CONFIGS / "recipes" / "adam.yaml"], ["optim.lr=0.003"])
    base = load_config(CONFIGS / "elmo_small.yaml")
    assert (cfg.optim.name, cfg.optim.lr) == ("adam", 0.003)
    assert cfg.optim.max_grad_norm == base.optim.max_grad_norm  # the preset's keys the recipe leaves alone
    assert cfg.model == base.model and cfg.train == base.train
    assert (base.optim.name, base.optim.lr) == ("adagrad", 0.2)  # the preset itself stays bilm-tf's recipe
    replaced = tmp_path / "filters.yaml"
    replaced.write_text("model:\n  char_cnn:\n    filters: [[1, 4]]\n")  # a list is replaced, not merged
    assert load_config([CONFIGS / "elmo_small.yaml", replaced]).model.char_cnn.filters == [[1, 4]]


@pytest.mark.parametrize("name", ["adam", "adam-warmup"])
def test_shipped_recipe_is_what_the_benchmark_measured(name, monkeypatch):
    """configs/recipes/NAME.yaml sets what benchmarks/divergence.py's recipe NAME measured (docs, README FAQ)."""
    monkeypatch.syspath_prepend(str(CONFIGS.parent / "benchmarks"))
    from divergence import RECIPES

    measured = load_config(CONFIGS / "elmo_small.yaml", [o for o in RECIPES[name] if o.startswith("optim.")])
    assert load_config([CONFIGS / "elmo_small.yaml", CONFIGS / "recipes" / f"{name}.yaml"]) == measured


def test_recipe_errors_name_the_file_that_set_the_key(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("optim:\n  name: adam\n  lrr: 0.002\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:3: unknown key 'optim\.lrr'"):
        load_config([CONFIGS / "elmo_small.yaml", bad])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml:2"):
        load_config([CONFIGS / "elmo_small.yaml", wrong])
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        load_config([CONFIGS / "elmo_small.yaml", tmp_path / "list.yaml"])


@pytest.mark.parametrize("value, message", [("1e39", "must be at most 3.403e+38 (the weights are float32), got 1e+39"),
                                            ("inf", "must be finite, got inf"), ("nan", "must be > 0, got nan"),
                                            ("0", "must be > 0, got 0.0")])
def test_a_learning_rate_the_optimizer_cannot_use_is_refused_naming_the_key(tmp_path, capsys, value, message):
    """lr 1e39 used to end in a traceback inside Adagrad (float32 overflow): the config refuses it first."""
    from bilm.cli import main as bilm_main
    code = bilm_main(["train", "--config", str(CONFIGS / "tiny.yaml"), "--data", str(tmp_path / "none.txt"), "--vocab", str(tmp_path / "v"),
                      "--out", str(tmp_path / "run"), "--set", f"optim.lr={value}"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "optim.lr" in err and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything is written
