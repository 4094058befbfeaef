"""One schema for bilm's settings: dataclasses read from plain dicts (YAML or JSON) and written back.

A settings class is a dataclass; each field states, once:

* its type: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | Y | None``,
  ``tuple[...]``, ``list[...]`` or another settings class (a nested mapping);
* as its default, the value a missing key takes (no default: the key is required);
* optionally, in ``metadata``: ``"key"``, its dotted place in the file when that is not the
  field's name (``embedding.dim``), and ``"if_none"``, what ``dump`` writes for None
  (``OMIT`` leaves the key out; without it None is written as null).

Values of the right type that cannot work are refused by the class's ``__post_init__``, which
raises ``FieldError(field, problem)``; ``load`` adds where the key is. ``load`` converts only
int -> float, lists -> tuples, a YAML boolean -> 'on'/'off' for a Literal that offers them
(YAML 1.1 reads a bare ``off`` as false), and with ``numeric_strings`` a numeric string -> float
(for YAML: PyYAML reads ``1e-8`` as a string).

Errors are ``SchemaError``; ``.key`` is the dotted key from the root, for finding its line in a
file. They are phrased in one of bilm's two styles, as its messages always were:

* ``"options"`` (the published options.json, and the config's ``model:`` section)::

      model.lstm: key 'dim' must be int, got str ('big')
      model.lstm: missing key 'dim'

* ``"config"`` (the config's other sections)::

      key 'train.batch_size' must be an integer, got str 'four'

Unknown keys read ``unknown key 'model.lstm.n_layer' (did you mean 'n_layers'?)`` in both.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from bilm.core.errors import InputError

OMIT = object()  # metadata "if_none": leave the key out of ``dump`` when the value is None

Style = Literal["options", "config"]

# What a value must be, as each style says it.
_WORDS = {int: ("int", "an integer"), float: ("float", "a number"), bool: ("bool", "true or false"),
          str: ("str", "a string"), dict: ("dict", "a mapping"), list: ("list", "a list")}


class SchemaError(InputError):
    """A value that does not fit the schema; ``key`` is its dotted key from the root."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


class FieldError(InputError):
    """Raised by a settings class's ``__post_init__``: field ``field`` has a value that cannot work."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"'{field}' {problem}")
        self.field, self.problem = field, problem


class _Mismatch(Exception):
    """The value is not of the expected type (the caller says which key and what it must be)."""


def load(cls: type, raw: dict, root: str, style: Style, ignore_unknown: bool = False, numeric_strings: bool = False):
    """Build ``cls`` from the mapping ``raw``; ``root`` names it in errors (a section or a file)."""
    return _Reader(root, style, ignore_unknown, numeric_strings).read(cls, raw, ())


def dump(obj) -> dict:
    """The plain dict ``load`` reads back: fields in order, at their keys, lists for tuples."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            value = f.metadata.get("if_none")
            if value is OMIT:
                continue
        *parents, leaf = _key_parts(f)
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dump(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key_parts(f: dataclasses.Field) -> list[str]:
    return f.metadata.get("key", f.name).split(".")


def dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every key a file of ``cls`` can hold, dotted from ``prefix`` (``model.char_cnn.embedding.dim``),
    nested dataclasses (optional ones too) walked."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = ".".join((prefix, *_key_parts(f)))
        inner = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        out += dotted_keys(inner, key) if inner is not None else [key]
    return out


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Reader:
    def __init__(self, root: str, style: Style, ignore_unknown: bool, numeric_strings: bool):
        self.root, self.style, self.ignore_unknown, self.numeric_strings = root, style, ignore_unknown, numeric_strings

    # ----- messages

    def error(self, path: tuple, problem: str, missing: bool = False) -> SchemaError:
        """``problem`` about the key at ``path`` (or that it is missing), named as the style names keys."""
        dotted = ".".join((self.root, *map(str, path)))
        if self.style == "options":
            section = ".".join((self.root, *map(str, path[:-1])))
            text = f"missing key '{path[-1]}'" if missing else f"key '{path[-1]}' {problem}"
            return SchemaError(f"{section}: {text}", dotted)
        return SchemaError(f"missing key '{dotted}'" if missing else f"key '{dotted}' {problem}", dotted)

    def type_error(self, path: tuple, hint: Any, value: Any) -> SchemaError:
        if typing.get_origin(hint) is Literal:
            got = repr(value)
        elif self.style == "options":
            got = f"{type(value).__name__} ({value!r})"
        else:
            got = "null" if value is None else f"{type(value).__name__} {value!r}"
        return self.error(path, f"must be {self.expected(hint)}, got {got}")

    def expected(self, hint: Any) -> str:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            return " or ".join(self.expected(a) for a in args if a is not type(None))
        if origin is Literal:
            return "one of " + ", ".join(map(repr, args))
        if origin is tuple:
            return f"a list of {len(args)} numbers"
        if origin is list:
            return f"{_WORDS[list][self.style == 'config']} of {self.expected(args[0])}"
        if dataclasses.is_dataclass(hint):
            hint = dict
        return _WORDS[origin or hint][self.style == "config"]

    # ----- reading

    def read(self, cls: type, raw: dict, path: tuple):
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        if not self.ignore_unknown:
            known: dict = {}
            for f in fields:
                node = known
                for part in _key_parts(f):
                    node = node.setdefault(part, {})
            self.reject_unknown(raw, known, path)
        values = {}
        for f in fields:
            found, value, at = self.find(raw, f, path)
            if found:
                values[f.name] = self.convert_at(value, hints[f.name], at)
        try:
            return cls(**values)
        except FieldError as e:
            raise self.error((*path, *_key_parts(_field(cls, e.field))), e.problem) from None

    def reject_unknown(self, raw: dict, known: dict, path: tuple) -> None:
        for key, value in raw.items():
            if key not in known:
                dotted = ".".join((self.root, *map(str, path), str(key)))
                raise SchemaError(f"unknown key '{dotted}'{suggest(str(key), list(known))}", dotted)
            if known[key] and isinstance(value, dict):  # a key of the file that is not a field: its sub-keys
                self.reject_unknown(value, known[key], (*path, key))

    def find(self, raw: dict, f: dataclasses.Field, path: tuple) -> tuple[bool, Any, tuple]:
        """(present, value, its path) of field ``f``; a missing required key is an error."""
        node, at = raw, path
        parts = _key_parts(f)
        for i, part in enumerate(parts):
            at = (*at, part)
            if part not in node:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.error(at, "", missing=True)
                return False, None, at
            node = node[part]
            if i < len(parts) - 1 and not isinstance(node, dict):
                raise self.type_error(at, dict, node)
        return True, node, at

    def convert_at(self, value: Any, hint: Any, path: tuple) -> Any:
        try:
            return self.convert(value, hint, path)
        except _Mismatch:
            raise self.type_error(path, hint, value) from None

    def convert(self, value: Any, hint: Any, path: tuple, in_list: bool = False) -> Any:
        """``value`` as ``hint``; raises _Mismatch when its own type is wrong (and, ``in_list``, its items')."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for member in args:
                if member is not type(None):
                    try:
                        return self.convert(value, member, path)
                    except _Mismatch:
                        pass
            raise _Mismatch
        if origin is Literal:
            if isinstance(value, bool) and "on" in args and "off" in args:
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (yes/no) as a boolean
            if value not in args:
                raise _Mismatch
            return value
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise _Mismatch
            return tuple(self.convert_at(v, a, path) for v, a in zip(value, args))
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise _Mismatch
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(self.convert(item, args[0], path, in_list=True))
                except _Mismatch:
                    if in_list:
                        raise
                    raise self.error(path, f"item {i} must be {self.expected(args[0])}, got {item!r}") from None
            return out
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise _Mismatch
            return self.read(hint, value, path)
        if hint is float and isinstance(value, str) and self.numeric_strings:
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise _Mismatch
        return value


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)
