"""Training configuration: typed dataclasses read from a YAML file plus ``--set key=value`` overrides.

A config file has three sections::

    model:   the architecture, in the structure of the published options.json
             (``lstm: {...}``, ``char_cnn: {...}``; no ``char_cnn`` means word inputs),
             parsed by ``bilm.options.BiLMOptions``
    train:   TrainConfig (batch, schedule, sampling, checkpoints, precision, strategy)
    optim:   OptimConfig (optimizer and gradient clipping)

Override values are parsed as YAML, so ``--set train.batch_size=64`` gives an int and
``--set model.char_cnn=null`` switches to word inputs. Errors name the file, the line
when it is known, and the dotted key. ``config_to_dict`` / ``config_from_dict`` give the
plain form saved with every checkpoint; the round trip is exact.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from bilm.options import BiLMOptions, OptionsError


class ConfigError(ValueError):
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
    lstm_impl: str = "exact"               # one of bilm.modules.lstm.LSTM_IMPLS
    # torch.compile of the exact LSTM's per-step math: auto = on for CUDA only (on a CPU compiling
    # took ~20 s and did not pay), on, off. The other lstm_impls ignore it.
    lstm_compile: Literal["auto", "on", "off"] = "auto"


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
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class Config:
    model: BiLMOptions
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


_SECTIONS: dict[str, type] = {"train": TrainConfig, "optim": OptimConfig}


# ----- public API -----

def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    raw = {} if raw is None else raw
    source = _Source(path, _key_lines(text))
    for override in overrides:
        key, value = _parse_override(override, path)
        source.overridden[key] = override
        _set_dotted(raw, key, value, source)
    return _build(raw, source)


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
    model = cfg.model.to_dict()
    if cfg.model.char_cnn is not None:
        # BiLMOptions.to_dict writes the published 262; keep what the config said so the round trip is exact.
        model["char_cnn"]["n_characters"] = cfg.model.char_cnn.n_characters
    return {
        "model": model,
        "train": _section_to_dict(cfg.train),
        "optim": _section_to_dict(cfg.optim),
    }


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=None)


# ----- building and checking -----

@dataclass
class _Source:
    """Where values came from, for error messages."""
    path: str
    lines: dict[str, int]                       # dotted key -> 1-based line in the file
    overridden: dict[str, str] = field(default_factory=dict)  # dotted key -> the --set text

    def where(self, key: str) -> str:
        for k, text in self.overridden.items():
            if key == k or key.startswith(k + "."):
                return f"{self.path}: --set {text}"
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else self.path


def _build(raw: Any, source: _Source) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.path}: expected a mapping with sections 'model', 'train', 'optim', "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in ("model", *_SECTIONS):
            raise ConfigError(f"{source.where(str(key))}: unknown key '{key}'{_suggest(str(key), ['model', *_SECTIONS])}")
    if "model" not in raw:
        raise ConfigError(f"{source.path}: missing section 'model'")
    model = _build_model(raw["model"], source)
    sections = {name: _build_section(cls, raw.get(name) or {}, name, source) for name, cls in _SECTIONS.items()}
    cfg = Config(model=model, **sections)
    _check_values(cfg, source)
    return cfg


def _model_keys() -> dict:
    """The keys BiLMOptions understands, nested as in options.json (from its own to_dict)."""
    return BiLMOptions(n_tokens_vocab=1).to_dict()


def _build_model(raw: Any, source: _Source) -> BiLMOptions:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.where('model')}: 'model' must be a mapping, got {type(raw).__name__}")
    # BiLMOptions.from_dict ignores keys it does not know; a typo must not pass silently.
    _reject_unknown(raw, _model_keys(), "model", source)
    try:
        return BiLMOptions.from_dict(raw, where="model")
    except OptionsError as e:
        # Its message starts with the dotted section ("model.lstm: key 'dim' ..."); add the file.
        message = str(e)
        section = message.split(":", 1)[0]
        key = message.split("'")[1] if "'" in message else ""
        raise ConfigError(f"{source.where(f'{section}.{key}' if key else section)}: {message}") from None


def _reject_unknown(raw: dict, known: dict, prefix: str, source: _Source) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(f"{source.where(dotted)}: unknown key '{dotted}'{_suggest(str(key), list(known))}")
        if isinstance(value, dict) and isinstance(known[key], dict):
            _reject_unknown(value, known[key], dotted, source)


def _build_section(cls: type, raw: Any, name: str, source: _Source):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.where(name)}: '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in hints:
            raise ConfigError(f"{source.where(dotted)}: unknown key '{dotted}'{_suggest(str(key), names)}")
        values[key] = _coerce(value, hints[key], dotted, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: _Source) -> Any:
    """Check ``value`` against a field's type; convert only int -> float and list -> tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, source)
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (yes/no, true/false) as a boolean
        if value not in args:
            raise ConfigError(f"{source.where(key)}: key '{key}' must be one of "
                              f"{', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, f"a list of {len(args)} numbers", value, source)
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(key, "true or false", value, source)
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(key, "an integer", value, source)
        return value
    if hint is float:
        # PyYAML reads "1e-8" (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _type_error(key, "a number", value, source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(key, "a string", value, source)
        return value
    raise TypeError(f"config field '{key}' has a type the loader does not handle: {hint}")


def _type_error(key: str, expected: str, value: Any, source: _Source) -> ConfigError:
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    return ConfigError(f"{source.where(key)}: key '{key}' must be {expected}, got {got}")


def _check_values(cfg: Config, source: _Source) -> None:
    """Values that have the right type but cannot work."""
    t, o = cfg.train, cfg.optim
    positive = {
        "train.batch_size": t.batch_size, "train.unroll_steps": t.unroll_steps, "train.n_epochs": t.n_epochs,
        "train.n_negative_samples_batch": t.n_negative_samples_batch, "train.log_every_steps": t.log_every_steps,
        "train.checkpoint_every_steps": t.checkpoint_every_steps, "train.keep_checkpoints": t.keep_checkpoints,
        "train.n_train_tokens": t.n_train_tokens, "train.max_steps": t.max_steps,
        "train.checkpoint_every_minutes": t.checkpoint_every_minutes, "optim.lr": o.lr,
        "optim.max_grad_norm": o.max_grad_norm,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{source.where(key)}: key '{key}' must be > 0, got {value}")
    non_negative = {"train.seed": t.seed, "optim.adam_eps": o.adam_eps, "optim.warmup_steps": o.warmup_steps,
                    "optim.weight_decay": o.weight_decay, "optim.initial_accumulator_value": o.initial_accumulator_value}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{source.where(key)}: key '{key}' must be >= 0, got {value}")
    from bilm.modules.lstm import LSTM_IMPLS  # here: the list lives with the implementations (imports torch)
    if t.lstm_impl not in LSTM_IMPLS:
        raise ConfigError(f"{source.where('train.lstm_impl')}: key 'train.lstm_impl' must be one of "
                          f"{', '.join(map(repr, LSTM_IMPLS))}, got {t.lstm_impl!r}")
    if not 0.0 <= t.dropout < 1.0:
        raise ConfigError(f"{source.where('train.dropout')}: key 'train.dropout' must be in [0, 1), got {t.dropout}")
    if not all(0.0 <= b < 1.0 for b in o.adam_betas):
        raise ConfigError(f"{source.where('optim.adam_betas')}: key 'optim.adam_betas' must be in [0, 1), "
                          f"got {list(o.adam_betas)}")


def _section_to_dict(section) -> dict:
    out = dataclasses.asdict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


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


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
