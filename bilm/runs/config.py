"""Training configuration: typed dataclasses read from a YAML file plus ``--set key=value`` overrides.

A config file has three sections::

    model:   the architecture, in the structure of the published options.json
             (``lstm: {...}``, ``char_cnn: {...}``; no ``char_cnn`` means word inputs),
             parsed by ``bilm.core.options.BiLMOptions``
    train:   TrainConfig (batch, schedule, sampling, checkpoints, precision, strategy)
    optim:   OptimConfig (optimizer and gradient clipping)

All three are read by the one schema reader, ``bilm.core.schema.load``. The ``model:`` section is
read as an options.json is: a missing key means what it means in the published file (the
dataclass defaults in ``bilm.core.options``; the presets in configs/ write every char-CNN and LSTM
key but ``n_characters``), and its errors are phrased as options.json errors are. Unlike options.json,
unknown keys are refused, and, as in every section, a numeric string where a number is
expected is read as that number (PyYAML reads ``1e-8`` as a string).

Override values are parsed as YAML, so ``--set train.batch_size=64`` gives an int and
``--set model.char_cnn=null`` switches to word inputs. Errors name the file, the line
when it is known, and the dotted key. ``config_to_dict`` / ``config_from_dict`` give the
plain form saved with every checkpoint; the round trip is exact.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from bilm.core.errors import InputError, not_utf8
from bilm.core.options import BiLMOptions
from bilm.core.schema import FieldError, SchemaError, Style, dotted_keys, dump, load, suggest


# The guard's training-loss bound, in units of log(vocab size); bilm evaluate and bilm score call a model
# whose mean loss passes it diverged (measured healthy runs: docs/divergence.md).
DIVERGENCE_LOSS_FACTOR = 3.0


class ConfigError(InputError):
    """A config file or override that cannot be used; the message names the file and the key."""


@dataclass
class TrainConfig:
    batch_size: int = 128                  # sequences per rank per step
    unroll_steps: int = 20                 # tokens per sequence per step (truncated BPTT length)
    n_epochs: int = 10
    n_train_tokens: int | None = None      # None: read from the corpus manifest
    max_steps: int | None = None           # stop earlier than n_epochs when set
    seed: int = 0
    dropout: float = 0.1
    n_negative_samples_batch: int = 8192   # sampled-softmax candidates per step
    same_negative_samples_across_ranks: bool = False  # False: each rank draws its own, as bilm-tf's towers did
    sparse_softmax: bool = True            # sparse gradients for the softmax matrix
    log_every_steps: int = 10
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when present
    precision: Literal["fp32", "bf16"] = "fp32"
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = None    # path of a DeepSpeed JSON/YAML config
    # How the LSTM runs: the names of bilm.modules.lstm.LSTM_IMPLS, spelled here so that reading a
    # config loads no torch (tests/test_config.py checks the two agree).
    # "exact", the fused path's former name, is read as "fused" (_build): older configs and checkpoints load.
    lstm_impl: Literal["fused", "reference", "cudnn"] = "fused"
    # torch.compile of the fused LSTM's per-step math: auto = on for CUDA only (on a CPU compiling
    # does not pay: docs/measurements.md, "lstm-compile"), on, off. The other lstm_impls ignore it.
    lstm_compile: Literal["auto", "on", "off"] = "auto"
    # Heldout perplexity while training (bilm.training.heldout) and the divergence guard (bilm.training.guard).
    eval_every_steps: int = 1000           # score the heldout sample every N steps and at the end; 0: never
    eval_tokens: int = 30000               # heldout sample: its first sentences up to this many tokens; 0: none
    divergence_factor: float = 2.0         # heldout perplexity above this x the direction's best so far is a divergence
    # A direction's training loss averaged over the guard's last 10 steps above this x log(vocab size) (the
    # uniform model's loss) is a divergence, heldout data or not; null: off (docs/divergence.md, the bound).
    divergence_loss_factor: float | None = DIVERGENCE_LOSS_FACTOR
    on_divergence: Literal["rollback", "stop", "warn"] = "rollback"
    rollback_lr_factor: float = 0.5        # each rollback multiplies the learning rate by this
    max_rollbacks: int = 3                 # stop after this many rollbacks in a row that do not pass the diverged step
    # After a rollback, skip the batches the abandoned stretch trained on (checkpoint to diverged step), as
    # large-model training skips the data around a loss spike. Off: on issue 21's diverged seed it did not
    # help (docs/training_parity.md, "Divergence"), and without it a rollback is exactly a resume.
    rollback_skip_data: bool = False
    # A rollback that follows another without getting past the diverged step goes one checkpoint further
    # back than the last (the newest max_rollbacks healthy checkpoints are then kept from pruning).
    rollback_further_back: bool = False

    def __post_init__(self):
        for key in ("batch_size", "unroll_steps", "n_epochs", "n_train_tokens", "max_steps", "n_negative_samples_batch",
                    "log_every_steps", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints"):
            _positive(self, key)
        for key in ("seed", "eval_every_steps", "eval_tokens", "max_rollbacks"):
            _non_negative(self, key)
        if not self.divergence_factor > 1.0:
            raise FieldError("divergence_factor", f"must be > 1, got {self.divergence_factor}")
        if self.divergence_loss_factor is not None and not self.divergence_loss_factor >= 1.0:
            raise FieldError("divergence_loss_factor", f"must be >= 1 (or null: off), got {self.divergence_loss_factor}")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise FieldError("rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class OptimConfig:
    name: Literal["adagrad", "adam"] = "adagrad"
    lr: float = 0.2
    initial_accumulator_value: float = 1.0  # Adagrad only
    max_grad_norm: float = 10.0             # global gradient-norm clip (bilm-tf all_clip_norm_val)
    # What is differentiated: "unroll_steps" = unroll_steps x the mean token loss, as bilm-tf
    # (its clip and Adagrad see that gradient); "none" = the mean token loss.
    loss_scale: Literal["unroll_steps", "none"] = "unroll_steps"
    warmup_steps: int = 0                   # ramp the learning rate up linearly over this many steps (bilm-tf: 0)
    decay: Literal["none", "linear"] = "none"  # linear: down to 0 at the run's last step (bilm-tf: none)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        for key in ("lr", "max_grad_norm"):
            _positive(self, key)
        for key in ("adam_eps", "warmup_steps", "weight_decay", "initial_accumulator_value"):
            _non_negative(self, key)
        if self.lr > FLOAT32_MAX:  # the optimizer multiplies float32 tensors by it: it would not convert
            raise FieldError("lr", f"must be at most {FLOAT32_MAX:.4g} (the weights are float32), got {self.lr:g}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise FieldError("adam_betas", f"must be in [0, 1), got {list(self.adam_betas)}")


FLOAT32_MAX = 3.4028234663852886e38


def _positive(section, key: str) -> None:
    value = getattr(section, key)
    if value is not None and not value > 0:  # NaN compares false: refused too
        raise FieldError(key, f"must be > 0, got {value}")
    if value is not None and not math.isfinite(value):
        raise FieldError(key, f"must be finite, got {value}")


def _non_negative(section, key: str) -> None:
    value = getattr(section, key)
    if not value >= 0:
        raise FieldError(key, f"must be >= 0, got {value}")
    if not math.isfinite(value):
        raise FieldError(key, f"must be finite, got {value}")


@dataclass
class Config:
    model: BiLMOptions
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# Each section's class and the style its errors are phrased in (bilm.core.schema).
_SECTIONS: dict[str, tuple[type, Style]] = {"model": (BiLMOptions, "options"), "train": (TrainConfig, "config"),
                                            "optim": (OptimConfig, "config")}


# ----- public API -----

def load_config(path: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``key=value`` overrides (dotted keys, YAML values).

    ``path`` may be several files: each later one is laid over the ones before it, key by key
    (a mapping merges, any other value replaces), so a recipe such as configs/recipes/adam.yaml
    that holds only the keys it changes goes on top of a size preset. ``--set`` comes last."""
    paths = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    if not paths:
        raise ConfigError("no config file given")
    raw: dict = {}
    source = _Source(paths[0], {})
    for one in paths:
        text, layer = _read_yaml(one)
        if not isinstance(layer, dict):
            raise ConfigError(f"{one}: expected a mapping with sections 'model', 'train', 'optim', "
                              f"got {type(layer).__name__}")
        _lay_over(raw, layer)
        source.lines.update({key: f"{one}:{line}" for key, line in _key_lines(text).items()})
    for override in overrides:
        key, value = _parse_override(override, paths[-1])
        source.overridden[key] = override
        _set_dotted(raw, key, value, source)
    return _build(raw, source)


def _read_yaml(path: str) -> tuple[str, Any]:
    """One config file's text and YAML (``{}`` when empty); errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(not_utf8(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    return text, {} if raw is None else raw


def _lay_over(base: dict, layer: dict) -> None:
    """Merge ``layer`` into ``base`` in place: mappings key by key, anything else replaced."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _lay_over(base[key], value)
        else:
            base[key] = value


def config_from_dict(d: dict, where: str = "config", overrides: Sequence[str] = ()) -> Config:
    """Inverse of ``config_to_dict`` (also accepts a partial dict: missing fields take defaults),
    then ``key=value`` overrides as ``load_config`` applies them."""
    import copy

    raw = copy.deepcopy(d)
    source = _Source(where, {})
    for override in overrides:
        key, value = _parse_override(override, where)
        source.overridden[key] = override
        _set_dotted(raw, key, value, source)
    return _build(raw, source)


def config_to_dict(cfg: Config) -> dict:
    """Plain dicts, lists, numbers and strings: safe for YAML, JSON and torch.save."""
    return {"model": dump(cfg.model), "train": dump(cfg.train), "optim": dump(cfg.optim)}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; whole or not at all (a reader never sees half a file)."""
    from bilm.core.atomic import atomic_open

    with atomic_open(os.fspath(path)) as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=None)


# ----- building and checking -----

@dataclass
class _Source:
    """Where values came from, for error messages."""
    path: str
    lines: dict[str, str]                       # dotted key -> "file:line" (1-based) that set it last
    overridden: dict[str, str] = field(default_factory=dict)  # dotted key -> the --set text

    def where(self, key: str) -> str:
        for k, text in self.overridden.items():
            if key == k or key.startswith(k + "."):
                return f"{self.path}: --set {text}"
        return self.lines.get(key, self.path)


def _build(raw: Any, source: _Source) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.path}: expected a mapping with sections 'model', 'train', 'optim', "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{source.where(str(key))}: unknown key '{key}'{suggest(str(key), list(_SECTIONS))}")
    if "model" not in raw:
        raise ConfigError(f"{source.path}: missing section 'model'")
    train = raw.get("train")
    if isinstance(train, dict) and train.get("lstm_impl") == "exact":
        train = raw["train"] = {**train, "lstm_impl": "fused"}  # the former name (LSTM_IMPL_ALIASES)
    return Config(**{name: _build_section(name, raw["model"] if name == "model" else raw.get(name) or {}, source)
                     for name in _SECTIONS})


def _build_section(name: str, raw: Any, source: _Source):
    cls, style = _SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.where(name)}: '{name}' must be a mapping, got {type(raw).__name__}")
    try:
        return load(cls, raw, root=name, style=style, numeric_strings=True)
    except SchemaError as e:
        message = str(e)
        if message.startswith("unknown key"):  # a key of another section given here: name where it is
            elsewhere = [key for key in _all_keys() if key.rsplit(".", 1)[-1] == e.key.rsplit(".", 1)[-1]]
            if elsewhere:
                message = f"unknown key '{e.key}' (did you mean {' or '.join(repr(k) for k in elsewhere)}?)"
        raise ConfigError(f"{source.where(e.key)}: {message}") from None


def _all_keys() -> list[str]:
    """Every dotted key of every section (``optim.lr``, ``model.lstm.dim``, ...): where a key given
    in the wrong section belongs."""
    return [key for name, (cls, _) in _SECTIONS.items() for key in dotted_keys(cls, name)]


# ----- overrides and source lines -----

def _parse_override(override: str, path: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{path}: --set {override!r}: expected key=value, e.g. train.batch_size=64")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: --set {override}: value is not valid YAML ({_yaml_problem(e)})") from None
    return key, value


def _set_dotted(raw: dict, key: str, value: Any, source: _Source) -> None:
    """Set ``a.b.c`` in nested dicts, creating missing mappings (unknown keys are caught later)."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[:i + 1])
            raise ConfigError(f"{source.where(key)}: cannot set '{key}': '{prefix}' is "
                              f"{type(child).__name__} {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> line number (1-based) of each mapping key in a YAML document."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong, and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem
