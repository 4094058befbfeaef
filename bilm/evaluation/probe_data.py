"""The labelled files ``bilm probe`` reads, checked line by line (errors name the file and the line).

Classification: ``label<TAB>text`` a line, other columns on request; a ``.csv`` file is read as CSV
(Python's csv module: quoted values may hold commas and newlines). Tagging: CoNLL-U (FORM and, by default, UPOS; comment
lines, multi-word ranges and empty nodes skipped) or whitespace-separated columns, the token in
column 1 and the tag in ``tag_column`` (1-based; default the last), a blank line after each sentence;
CoNLL-2003's ``-DOCSTART-`` lines are document boundaries, not tokens.
"""
from __future__ import annotations

import re
import csv
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from bilm.core.errors import InputError, not_utf8

CONLLU_COLUMNS = 10
CONLLU_FORM, CONLLU_UPOS = 2, 4  # 1-based, as --tag-column counts
DOCUMENT_MARKER = "-DOCSTART-"  # CoNLL-2000/2003 column files: a line that starts a document
_CONLLU_ID = re.compile(r"^\d+(-\d+|\.\d+)?$")


@dataclass
class LabelledData:
    """One file's examples: a sentence each. ``texts`` (classification: raw text for the model's
    tokenizer) or ``tokens`` (tagging: tokens as the file gives them); ``labels`` is one label per
    sentence (classification) or one tag per token (tagging); ``lines`` the line of each sentence
    (its first token's), ``token_lines`` each token's (tagging)."""
    path: str
    task: str  # "classify" or "tag"
    labels: list
    lines: list[int]
    texts: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    token_lines: list[list[int]] = field(default_factory=list)
    reader: str = "tsv"  # tsv (or tsv:label=N,text=M), conllu or columns
    header_line: Optional[int] = None  # the line skipped as a header

    def __len__(self) -> int:
        return len(self.lines)

    def subset(self, index) -> "LabelledData":
        """The examples at ``index`` (sentence indices), in that order."""
        pick = lambda xs: [xs[i] for i in index] if xs else []  # noqa: E731
        return LabelledData(self.path, self.task, pick(self.labels), pick(self.lines), pick(self.texts),
                            pick(self.tokens), pick(self.token_lines), self.reader, self.header_line)

    def label_set(self) -> list[str]:
        flat = self.labels if self.task == "classify" else [t for tags in self.labels for t in tags]
        return sorted(set(flat))


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError:
        raise InputError(not_utf8(path)) from None
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, expected a file") from None


# A first line whose label field is one of these, and whose label no other line has, is the header a
# spreadsheet or pandas writes (GLUE's SST-2 starts "sentence<TAB>label"): skipped, and said so.
HEADER_LABELS = {"label", "labels", "class", "category", "target", "sentiment", "y", "gold", "tag"}
# More than this share of lines with a label no other line has, in a file of at least
# MIN_LINES_TO_JUDGE lines, means the label column holds text: every probe of it would score 0.
UNIQUE_LABEL_SHARE = 0.5
MIN_LINES_TO_JUDGE = 10


def _is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


def _layout(path: str, label_column: Optional[int], text_column: Optional[int]) -> str:
    """How a classification file's columns are read, as the report and the vector cache name it."""
    if label_column is None and text_column is None and not _is_csv(path):
        return "tsv"
    return f"{'csv' if _is_csv(path) else 'tsv'}:label={label_column or 1},text={text_column or 'last'}"


def _classification_rows(path: str, whole_text: bool) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row: tab-separated lines (``whole_text``: cut at the first
    tab only, label<TAB>text whose text may hold tabs), or for a ``.csv`` file the rows of Python's csv
    reader (quoted values may hold commas and newlines; a row's number is its first line)."""
    if not _is_csv(path):
        for number, line in enumerate(_read_lines(path), 1):
            if line.strip():
                yield number, line.split("\t", 1 if whole_text else -1)
        return
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            start = 1
            for fields in rows:
                if any(field.strip() for field in fields):
                    yield start, fields
                start = rows.line_num + 1
    except UnicodeDecodeError:
        raise InputError(not_utf8(path)) from None
    except csv.Error as e:
        raise InputError(f"{path}, line {rows.line_num}: not a readable CSV row ({e})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, expected a file") from None


def _classification_fields(path: str, number: int, fields: list[str], label_column: Optional[int],
                           text_column: Optional[int]) -> tuple[str, str]:
    """The label and the text of one row; by default the label is column 1 and the text the last
    other column (label<TAB>text: the rest of the line)."""
    if len(fields) == 1 and label_column is None and text_column is None and not _is_csv(path):
        raise InputError(f"{path}, line {number}: no tab (each line is label<TAB>text; for text<TAB>label "
                         f"give --label-column 2; a comma-separated file must be named .csv)")
    label_at = label_column or 1
    others = [i for i in range(1, len(fields) + 1) if i != label_at]
    text_at = text_column or (others[-1] if others else None)
    for name, at in (("--label-column", label_at), ("--text-column", text_at)):
        if at is None or at > len(fields):
            raise InputError(f"{path}, line {number}: {len(fields)} {'comma' if _is_csv(path) else 'tab'}-separated "
                             f"column{'s' if len(fields) != 1 else ''}, too few for {name} {at or label_at + 1}")
    return fields[label_at - 1], fields[text_at - 1]


def read_classification(path: str, label_column: Optional[int] = None, text_column: Optional[int] = None,
                        training: bool = True) -> LabelledData:
    """``label<TAB>text`` lines (or the label and text in the columns given, counted from 1; the text
    is then the last column other than the label's unless ``text_column`` says); blank lines are
    skipped, and so is a header line (see ``HEADER_LABELS``). A training file's labels are checked to
    be labels; a test or dev file's are checked against the training file's (``unseen_labels``), as
    a small test file of a task with many classes has most of its labels once."""
    for name, at in (("--label-column", label_column), ("--text-column", text_column)):
        if at is not None and at < 1:
            raise InputError(f"{name} counts from 1, got {at}")
    if label_column is not None and label_column == text_column:
        raise InputError(f"--label-column and --text-column are both {label_column}")
    data = LabelledData(path, "classify", [], [], reader=_layout(path, label_column, text_column))
    for number, fields in _classification_rows(path, whole_text=label_column is None and text_column is None):
        label, text = _classification_fields(path, number, fields, label_column, text_column)
        if not label.strip():
            raise InputError(f"{path}, line {number}: empty label (each line is label<TAB>text)")
        if not text.strip():
            raise InputError(f"{path}, line {number}: empty text after the label {label.strip()!r}")
        data.labels.append(label.strip())
        data.texts.append(text.strip())
        data.lines.append(number)
    if not data.lines:
        raise InputError(f"{path}: no examples (empty file; each line is label<TAB>text)")
    counts = Counter(data.labels)
    if data.labels[0].lower() in HEADER_LABELS and counts[data.labels[0]] == 1 and len(data) > 1:
        header = data.lines[0]
        data = data.subset(range(1, len(data)))
        data.header_line = header
        counts = Counter(data.labels)
    if training:
        _check_labels_are_labels(data, counts, label_column)
    return data


def _check_labels_are_labels(data: LabelledData, counts: Counter, label_column: Optional[int]) -> None:
    """A file read with its columns swapped has a different "label" on nearly every line."""
    unique = [i for i, label in enumerate(data.labels) if counts[label] == 1]
    if len(data) < MIN_LINES_TO_JUDGE or len(unique) <= UNIQUE_LABEL_SHARE * len(data):
        return
    first = unique[0]
    column = label_column or 1
    hint = (f"for text{',' if _is_csv(data.path) else '<TAB>'}label give --label-column 2" if label_column is None
            else "--label-column and --text-column apply to --train, --dev and --test alike")
    raise InputError(f"{data.path}: {len(unique)} of {len(data)} lines have a label no other line has (line "
                     f"{data.lines[first]}: {data.labels[first][:60]!r}): column {column} looks like text, not a "
                     f"label; {hint}")


def is_conllu(lines: list[str]) -> bool:
    """CoNLL-U when the first line that is neither blank nor a comment has ten tab-separated
    fields and a CoNLL-U ID (``#`` lines are tokens in other column formats, e.g. CoNLL-2000)."""
    for line in lines:
        if line.strip() and not line.startswith("#"):
            fields = line.split("\t")
            return len(fields) == CONLLU_COLUMNS and bool(_CONLLU_ID.match(fields[0]))
    return False


def read_tagging(path: str, tag_column: Optional[int] = None) -> LabelledData:
    """Sentences of (token, tag) from CoNLL-U or whitespace-separated columns (see the module's doc)."""
    lines = _read_lines(path)
    conllu = is_conllu(lines)
    data = LabelledData(path, "tag", [], [], reader="conllu" if conllu else "columns")
    token_column = CONLLU_FORM if conllu else 1
    if tag_column is not None and tag_column < 1:
        raise InputError(f"--tag-column counts from 1, got {tag_column}")
    tokens: list[str] = []
    tags: list[str] = []
    numbers: list[int] = []
    width = first = 0

    def close() -> None:
        if tokens:
            data.tokens.append(list(tokens))
            data.labels.append(list(tags))
            data.token_lines.append(list(numbers))
            data.lines.append(numbers[0])
            tokens.clear(), tags.clear(), numbers.clear()

    for number, line in enumerate(lines, 1):
        if not line.strip():
            close()
            width = 0
            continue
        if conllu and line.startswith("#"):
            continue
        fields = line.split("\t") if conllu else line.split()
        if not conllu and fields[0] == DOCUMENT_MARKER:
            continue  # CoNLL-2003's document boundary: no token (a sentence of it would be scored as "O")
        if conllu and not _CONLLU_ID.match(fields[0]):
            raise InputError(f"{path}, line {number}: {fields[0]!r} is not a CoNLL-U token ID")
        if width == 0:
            width, first = len(fields), number
        elif len(fields) != width:
            raise InputError(f"{path}, line {number}: {len(fields)} columns, but the sentence's first line "
                             f"(line {first}) has {width}")
        if conllu and not fields[0].isdigit():
            continue  # a multi-word range (1-2) or an empty node (3.1): not a token of the sentence
        if width < 2:
            raise InputError(f"{path}, line {number}: one column; a token line is the token, then its tag "
                             "(whitespace-separated)")
        column = tag_column or (CONLLU_UPOS if conllu else width)
        if column > width:
            raise InputError(f"{path}, line {number}: --tag-column {column} is out of range (the line has "
                             f"{width} columns)")
        if column == token_column:
            raise InputError(f"{path}: --tag-column {column} is the token column")
        token, tag = fields[token_column - 1], fields[column - 1]
        if not token.strip() or not tag.strip():
            raise InputError(f"{path}, line {number}: empty {'token' if not token.strip() else 'tag'}")
        tokens.append(token)
        tags.append(tag)
        numbers.append(number)
    close()
    if not data.lines:
        raise InputError(f"{path}: no sentences (empty file; a token and its tag a line, a blank line after "
                         "each sentence)")
    return data


def read_task_file(path: str, task: str, tag_column: Optional[int] = None, label_column: Optional[int] = None,
                   text_column: Optional[int] = None, training: bool = True) -> LabelledData:
    if task == "classify":
        if tag_column is not None:
            raise InputError("--tag-column is for --task tag; a classification file's columns are --label-column "
                             "and --text-column")
        return read_classification(path, label_column, text_column, training)
    if label_column is not None or text_column is not None:
        raise InputError("--label-column and --text-column are for --task classify; a tagging file's tag column "
                         "is --tag-column")
    if task == "tag":
        return read_tagging(path, tag_column)
    raise InputError(f"--task must be classify or tag, got {task!r}")


def subsample(data: LabelledData, limit: Optional[int], seed: int) -> LabelledData:
    """At most ``limit`` sentences of ``data``, a fixed random sample in file order."""
    if not limit or limit >= len(data):
        return data
    keep = np.sort(np.random.RandomState(seed).permutation(len(data))[:limit])
    return data.subset(keep.tolist())


def dev_split(data: LabelledData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) sentence indices of ``data``, each in file order: ``fraction`` of the sentences,
    drawn with ``seed``, held out for choosing epochs."""
    if not 0 < fraction < 1:
        raise InputError(f"--dev-fraction must be between 0 and 1, got {fraction}")
    n = len(data)
    n_dev = int(round(n * fraction))
    if n_dev < 1 or n - n_dev < 1:
        raise InputError(f"{data.path}: {n} example{'s' if n != 1 else ''} cannot be split into training and dev "
                         f"sets with --dev-fraction {fraction}")
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[n_dev:]), np.sort(order[:n_dev])


def unseen_labels(test: LabelledData, train_labels: list[str], train_path: str) -> Optional[str]:
    """A warning naming the first test label (or tag) the training file never has, and how many; an
    error when the training file has none of them (a column swapped or misplaced in one of the files:
    every score would be 0)."""
    known = set(train_labels)
    first, count, total = None, 0, 0
    if test.task == "classify":
        for label, line in zip(test.labels, test.lines):
            total += 1
            if label not in known:
                count += 1
                first = first or (line, label)
    else:
        for tags, lines in zip(test.labels, test.token_lines):
            for tag, line in zip(tags, lines):
                total += 1
                if tag not in known:
                    count += 1
                    first = first or (line, tag)
    if first is None:
        return None
    what = "label" if test.task == "classify" else "tag"
    if count == total:
        column = ("--label-column" if test.task == "classify" else "--tag-column")
        raise InputError(f"{test.path}: none of its {what}s appears in {train_path} (line {first[0]}: "
                         f"{first[1][:60]!r}; {train_path} has {len(known)}, e.g. {sorted(known)[0][:60]!r}): "
                         f"are the two files' columns the same? ({column} applies to both)")
    return (f"{test.path}, line {first[0]}: {what} {first[1]!r} never appears in {train_path}; scored as wrong "
            f"({count} such {'line' if test.task == 'classify' else 'token'}{'s' if count > 1 else ''})")
