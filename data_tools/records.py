"""JSON lines -> the text lines of their text field (in the workers), bad records counted.

One JSON object per line; ``--text-field`` names the field holding the text, a dotted path for a
nested one (``meta.body``: ``{"meta": {"body": "..."}}``). A value holding newlines is several
lines, as it would be in a text file. Blank lines are no records. A line that is not JSON, not
an object, lacks the field or holds something else than a string there is a bad record: counted
by reason, the first one's line kept so that the run can stop there or report it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape half a pair ("\ud83d"), which UTF-8 cannot hold


@dataclass
class JsonText:
    lines: list[str] = field(default_factory=list)
    records: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    first_bad: tuple[int, str] | None = None  # (1-based line number in the file, why)
    surrogates: int = 0  # lone surrogates replaced by U+FFFD (counted as invalid UTF-8)


def _describe(value) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_lines_text(text: str, path: tuple[str, ...], first_line: int) -> JsonText:
    """The text lines of the records in ``text`` (whole lines, the first being line ``first_line + 1``)."""
    out = JsonText()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    loads, name = json.loads, ".".join(path)

    def bad(number: int, reason: str, why: str) -> None:
        out.bad[reason] = out.bad.get(reason, 0) + 1
        if out.first_bad is None:
            out.first_bad = (first_line + number + 1, why)

    for number, line in enumerate(lines):
        if not line or line.isspace():
            continue
        out.records += 1
        try:
            value = loads(line)
        except ValueError as e:  # JSONDecodeError, and RecursionError's kin for absurd nesting
            bad(number, "not_json", f"not JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})")
            continue
        except RecursionError:
            bad(number, "not_json", "not JSON (nested too deeply)")
            continue
        if not isinstance(value, dict):
            bad(number, "not_object", f"{_describe(value)}, not a JSON object")
            continue
        for depth, key in enumerate(path):
            if not isinstance(value, dict) or key not in value:
                where = "" if depth == 0 else f" in {'.'.join(path[:depth])!r}"
                bad(number, "no_field", f"no field {key!r}{where} (--text-field {name})")
                break
            value = value[key]
        else:
            if not isinstance(value, str):
                bad(number, "not_string", f"field {name!r} holds {_describe(value)}, not a string")
                continue
            # A lone surrogate can only come from a \uD800-\uDFFF escape (the text was decoded from UTF-8):
            # a substring test of the line spares most records the regular expression.
            if ("\\ud" in line or "\\uD" in line) and _SURROGATE.search(value):
                value, replaced = _SURROGATE.subn("\ufffd", value)
                out.surrogates += replaced
            out.lines.extend(value.split("\n"))
    return out
