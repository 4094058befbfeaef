"""The biLM architecture options: the published ``options.json`` as typed dataclasses.

``BiLMOptions.from_dict`` reads the dict bilm-tf wrote (and AllenNLP reads);
``to_dict`` writes it back. Errors name the offending key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bilm.chars import DEFAULT_MAX_CHARACTERS, N_CHARACTERS


class OptionsError(ValueError):
    """A missing or mistyped key in options.json or a config's model section."""


def _get(d: dict, key: str, kind, where: str, default: Any = ...):
    if key not in d:
        if default is ...:
            raise OptionsError(f"{where}: missing key '{key}'")
        return default
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise OptionsError(f"{where}: key '{key}' must be {names}, got {type(value).__name__} ({value!r})")
    return value


@dataclass
class CharCNNOptions:
    embedding_dim: int = 16
    filters: list[list[int]] = field(default_factory=lambda: [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]])
    n_highway: int = 2
    activation: str = "relu"
    max_characters_per_token: int = DEFAULT_MAX_CHARACTERS
    n_characters: int = N_CHARACTERS

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)

    @classmethod
    def from_dict(cls, d: dict, where: str = "char_cnn") -> "CharCNNOptions":
        if not isinstance(d, dict):
            raise OptionsError(f"{where} must be a mapping, got {type(d).__name__}")
        embedding = _get(d, "embedding", dict, where)
        filters = _get(d, "filters", list, where)
        for i, f in enumerate(filters):
            if not (isinstance(f, (list, tuple)) and len(f) == 2 and all(isinstance(x, int) and x > 0 for x in f)):
                raise OptionsError(f"{where}: key 'filters' item {i} must be [width, n_filters], got {f!r}")
        activation = _get(d, "activation", str, where, "relu")
        if activation not in ("relu", "tanh"):
            raise OptionsError(f"{where}: key 'activation' must be 'relu' or 'tanh', got {activation!r}")
        out = cls(
            embedding_dim=_get(embedding, "dim", int, f"{where}.embedding"),
            filters=[list(f) for f in filters],
            n_highway=_get(d, "n_highway", int, where, 0),
            activation=activation,
            max_characters_per_token=_get(d, "max_characters_per_token", int, where, DEFAULT_MAX_CHARACTERS),
            n_characters=_get(d, "n_characters", int, where, N_CHARACTERS),
        )
        if not out.filters:
            raise OptionsError(f"{where}: key 'filters' must list at least one [width, n_filters]")
        if out.embedding_dim < 1:
            raise OptionsError(f"{where}.embedding: key 'dim' must be >= 1, got {out.embedding_dim}")
        if out.n_highway < 0:
            raise OptionsError(f"{where}: key 'n_highway' must be >= 0, got {out.n_highway}")
        widest = max(w for w, _ in out.filters)
        if out.max_characters_per_token < max(3, widest):
            raise OptionsError(f"{where}: key 'max_characters_per_token' ({out.max_characters_per_token}) "
                               f"must be >= 3 and >= the widest filter ({widest})")
        if out.n_characters not in (261, 262):
            raise OptionsError(f"{where}: key 'n_characters' must be 261 (training) or 262 (prediction), got {out.n_characters}")
        return out

    def to_dict(self) -> dict:
        return {
            "embedding": {"dim": self.embedding_dim},
            "filters": [list(f) for f in self.filters],
            "n_highway": self.n_highway,
            "activation": self.activation,
            "max_characters_per_token": self.max_characters_per_token,
            # Published files say 262: the prediction setting, with row 0 as the mask.
            "n_characters": N_CHARACTERS,
        }


@dataclass
class LstmOptions:
    dim: int = 4096
    projection_dim: int = 512
    n_layers: int = 2
    cell_clip: float | None = 3.0
    proj_clip: float | None = 3.0
    use_skip_connections: bool = True

    @classmethod
    def from_dict(cls, d: dict, where: str = "lstm") -> "LstmOptions":
        if not isinstance(d, dict):
            raise OptionsError(f"{where} must be a mapping, got {type(d).__name__}")
        out = cls(
            dim=_get(d, "dim", int, where),
            projection_dim=_get(d, "projection_dim", int, where),
            n_layers=_get(d, "n_layers", int, where),
            cell_clip=_get(d, "cell_clip", (int, float, type(None)), where, None),
            proj_clip=_get(d, "proj_clip", (int, float, type(None)), where, None),
            use_skip_connections=_get(d, "use_skip_connections", bool, where, False),
        )
        for key in ("dim", "projection_dim", "n_layers"):
            if getattr(out, key) < 1:
                raise OptionsError(f"{where}: key '{key}' must be >= 1, got {getattr(out, key)}")
        if out.projection_dim > out.dim:
            raise OptionsError(f"{where}: 'projection_dim' ({out.projection_dim}) must be <= 'dim' ({out.dim})")
        for key in ("cell_clip", "proj_clip"):
            value = getattr(out, key)
            if value is not None and value <= 0:
                setattr(out, key, None)  # bilm-tf treats 0 as "no clipping"
        return out

    def to_dict(self) -> dict:
        return {
            "dim": self.dim,
            "projection_dim": self.projection_dim,
            "n_layers": self.n_layers,
            "cell_clip": self.cell_clip if self.cell_clip is not None else 0,
            "proj_clip": self.proj_clip if self.proj_clip is not None else 0,
            "use_skip_connections": self.use_skip_connections,
        }


@dataclass
class BiLMOptions:
    """The architecture. ``char_cnn`` None means word inputs (an embedding table of ``n_tokens_vocab`` rows)."""
    lstm: LstmOptions = field(default_factory=LstmOptions)
    char_cnn: CharCNNOptions | None = field(default_factory=CharCNNOptions)
    n_tokens_vocab: int | None = None  # word-input mode only

    @property
    def projection_dim(self) -> int:
        return self.lstm.projection_dim

    @property
    def output_dim(self) -> int:
        """Width of every ELMo layer: forward and backward concatenated."""
        return 2 * self.lstm.projection_dim

    @classmethod
    def from_dict(cls, d: dict, where: str = "options") -> "BiLMOptions":
        if not isinstance(d, dict):
            raise OptionsError(f"{where} must be a mapping, got {type(d).__name__}")
        lstm = LstmOptions.from_dict(_get(d, "lstm", dict, where), f"{where}.lstm")
        char_cnn = d.get("char_cnn")
        n_tokens_vocab = _get(d, "n_tokens_vocab", (int, type(None)), where, None)
        return cls(
            lstm=lstm,
            char_cnn=CharCNNOptions.from_dict(char_cnn, f"{where}.char_cnn") if char_cnn is not None else None,
            n_tokens_vocab=n_tokens_vocab,
        )

    @classmethod
    def from_file(cls, path: str) -> "BiLMOptions":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise OptionsError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise OptionsError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        return cls.from_dict(raw, where=str(path))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"lstm": self.lstm.to_dict()}
        if self.char_cnn is not None:
            out["char_cnn"] = self.char_cnn.to_dict()
        if self.n_tokens_vocab is not None:
            out["n_tokens_vocab"] = self.n_tokens_vocab
        return out
