"""The biLM architecture options: the published ``options.json`` as typed dataclasses.

These classes are the one schema of the architecture, read by ``bilm.core.schema`` both from an
``options.json`` (``BiLMOptions.from_dict`` / ``from_file``) and from a config's ``model:``
section (``bilm.runs.config``). A field's default is the value a key missing from the file takes,
as bilm-tf reads its own files (``options['lstm'].get('cell_clip')`` and so on): no clipping,
no skip connections, no highway layers, word inputs when ``char_cnn`` is absent. A field
without a default is a required key. A clip of 0 (or less) means no clipping, as in bilm-tf.
Keys the schema does not know are ignored in options.json (bilm-tf's file also holds its
training settings) and refused in a config.

``to_dict`` writes the published file back. Errors name the offending key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bilm.core.chars import DEFAULT_MAX_CHARACTERS, N_CHARACTERS
from bilm.core.errors import read_json
from bilm.core.schema import OMIT, FieldError, SchemaError, dump, load


class OptionsError(SchemaError):
    """A missing or mistyped key in an options.json (``from_dict``/``from_file``; a config's model
    section reports through ``bilm.runs.config.ConfigError``)."""


@dataclass
class CharCNNOptions:
    # Defaults: what a key missing from options.json (or model.char_cnn) means. No default: required.
    embedding_dim: int = field(metadata={"key": "embedding.dim"})
    filters: list[list[int]]               # [width, n_filters] per convolution
    n_highway: int = 0                     # bilm-tf: a missing n_highway is no highway layers
    activation: Literal["relu", "tanh"] = "relu"
    max_characters_per_token: int = DEFAULT_MAX_CHARACTERS
    # 261 (training) or 262 (prediction: ids shifted by one, 0 the mask); the weights are the same.
    n_characters: int = N_CHARACTERS

    def __post_init__(self):
        for i, f in enumerate(self.filters):
            if not (isinstance(f, (list, tuple)) and len(f) == 2 and all(isinstance(x, int) and x > 0 for x in f)):
                raise FieldError("filters", f"item {i} must be [width, n_filters], got {f!r}")
        if not self.filters:
            raise FieldError("filters", "must list at least one [width, n_filters]")
        if self.embedding_dim < 1:
            raise FieldError("embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        if self.n_highway < 0:
            raise FieldError("n_highway", f"must be >= 0, got {self.n_highway}")
        widest = max(w for w, _ in self.filters)
        if self.max_characters_per_token < max(3, widest):
            raise FieldError("max_characters_per_token", f"({self.max_characters_per_token}) must be >= 3 "
                                                         f"and >= the widest filter ({widest})")
        if self.n_characters not in (261, 262):
            raise FieldError("n_characters", f"must be 261 (training) or 262 (prediction), got {self.n_characters}")

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)

    def to_dict(self) -> dict:
        """As published: ``n_characters`` always says 262, the prediction setting (row 0 the mask) that
        AllenNLP reads; ``bilm.core.schema.dump`` gives the field as it is (a config keeps 261 if it said so)."""
        return {**dump(self), "n_characters": N_CHARACTERS}


@dataclass
class LstmOptions:
    # Defaults: what a key missing from options.json (or model.lstm) means, as bilm-tf reads it. No default: required.
    dim: int
    projection_dim: int
    n_layers: int
    # None: no clipping (missing, or 0 or less as bilm-tf reads it); written as 0. An int stays an int.
    cell_clip: int | float | None = field(default=None, metadata={"if_none": 0})
    proj_clip: int | float | None = field(default=None, metadata={"if_none": 0})
    use_skip_connections: bool = False     # missing: none (AllenNLP requires true; bilm export warns)

    def __post_init__(self):
        for key in ("dim", "projection_dim", "n_layers"):
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.projection_dim > self.dim:
            raise FieldError("projection_dim", f"({self.projection_dim}) must be <= 'dim' ({self.dim})")
        for key in ("cell_clip", "proj_clip"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                setattr(self, key, None)  # bilm-tf treats 0 as "no clipping"

    def to_dict(self) -> dict:
        return dump(self)


@dataclass
class BiLMOptions:
    """The architecture. ``char_cnn`` None means word inputs (an embedding table of ``n_tokens_vocab`` rows)."""
    lstm: LstmOptions
    # Missing (or null): word inputs. None is written by leaving the key out.
    char_cnn: CharCNNOptions | None = field(default=None, metadata={"if_none": OMIT})
    n_tokens_vocab: int | None = field(default=None, metadata={"if_none": OMIT})  # word-input mode only

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
            raise OptionsError(f"{where} must be a mapping, got {type(d).__name__}", where)
        try:
            return load(cls, d, root=where, style="options", ignore_unknown=True)
        except SchemaError as e:
            raise OptionsError(str(e), e.key) from None

    @classmethod
    def from_file(cls, path: str) -> "BiLMOptions":
        return cls.from_dict(read_json(path, OptionsError), where=str(path))

    def to_dict(self) -> dict:
        """The published options.json."""
        out = dump(self)
        if "char_cnn" in out:
            out["char_cnn"]["n_characters"] = N_CHARACTERS  # as CharCNNOptions.to_dict says
        return out
