"""Text cleaning and tokenization: raw decoded text -> lists of tokens per line.

``TextPipeline`` is the one place that says how raw text becomes tokens: ``bilm prepare``
builds the training data with it, the trainer saves it in every checkpoint, ``bilm export``
writes it beside the weights (``tokenizer.json``, plus ``sentencepiece.model``), and
``bilm embed`` / ``bilm evaluate`` / ``bilm score`` / ``ElmoEmbedder.embed_text`` (PyTorch or
ONNX) apply it to raw text.

Tokenizers: ``whitespace`` (the text is already tokenized), ``sentencepiece`` (the pieces of a
model that travels with the pipeline) and ``moses`` (raw text, the Moses tokenizer rules the
1B Word Benchmark that trained the original ELMo was made with, through sacremoses, escaping
off). Optionally each line is first split into sentences (sentencex).
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

from bilm.core.errors import InputError, MissingExtra, read_json
from bilm.core.files import SP_MODEL_FILE, TOKENIZER_FILE

TOKENIZERS = ("whitespace", "sentencepiece", "moses")
SENTENCE_SPLITTERS = ("sentencex",)
MISSING_TEXT_EXTRA = ("the {what} needs the text extra: pip install 'bilm[text]' "
                      "(or pip install sacremoses sentencex)")


def _control_table() -> dict[int, str | None]:
    """str.translate table: C0/C1 controls removed, the whitespace ones turned into a space.

    ``\\n`` stays (it separates lines); the byte-order mark U+FEFF is removed too.
    """
    table: dict[int, str | None] = {}
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        if code != 0x0A:
            table[code] = " " if chr(code).isspace() else None
    table[0xFEFF] = None
    return table


_CONTROL = _control_table()


def clean_text(text: str, nfkc: bool) -> tuple[str, int]:
    """NFKC (optional) then control characters removed; returns (text, characters removed)."""
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    cleaned = text.translate(_CONTROL)
    return cleaned, len(text) - len(cleaned)


class Tokenizer(Protocol):
    name: str

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        ...


class WhitespaceTokenizer:
    """The input is already tokenized: tokens are separated by (any Unicode) whitespace."""
    name = "whitespace"

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        return [line.split() for line in lines]


class SentencePieceTokenizer:
    """Tokens are the pieces of a SentencePiece model (``▁`` marks a preceding space)."""
    name = "sentencepiece"

    def __init__(self, model_path: Optional[str] = None, model_proto: Optional[bytes] = None):
        import sentencepiece

        self.model_path = model_path
        if model_proto is not None:
            self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        else:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        # Collapse whitespace first so that no piece can contain a space the reader would split on.
        pieces = self._processor.encode([" ".join(line.split()) for line in lines], out_type=str)
        return [[p for p in line if p.strip()] for line in pieces]


class MosesTokenizer:
    """Raw text -> tokens by the Moses tokenizer's rules (sacremoses; ``escape=False``: ``&``, ``<``
    stay as they are, not ``&amp;``; the default, not aggressive, hyphen splitting). ``lang`` picks
    the non-breaking prefixes ("Dr.", "z.B.") and a few language rules; Moses falls back to the
    English prefixes for a language it has none for."""
    name = "moses"

    def __init__(self, lang: str = "en"):
        try:
            import sacremoses
        except ImportError:
            raise MissingExtra(MISSING_TEXT_EXTRA.format(what="moses tokenizer")) from None
        self.lang = lang
        self._moses = sacremoses.MosesTokenizer(lang=lang)

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        # Split again on any whitespace: a token never holds a space the shard reader would split on.
        return [self._moses.tokenize(line, escape=False, return_str=True).split() if line and not line.isspace()
                else [] for line in lines]


def moses_languages() -> set[str]:
    """The languages Moses has non-breaking prefixes for (others get the English ones)."""
    try:
        from sacremoses.corpus import NonbreakingPrefixes
    except ImportError:
        raise MissingExtra(MISSING_TEXT_EXTRA.format(what="moses tokenizer")) from None
    return set(NonbreakingPrefixes().available_langs.values())


class SentenceSplitter:
    """A line (a paragraph, a document) -> its sentences, by sentencex (Wikimedia's rule-based
    segmenter: abbreviations and numbers of ~300 languages; Rust, tens of MB/s)."""

    def __init__(self, name: str = "sentencex", lang: str = "en"):
        if name not in SENTENCE_SPLITTERS:
            raise InputError(f"unknown sentence splitter {name!r} (expected one of {', '.join(SENTENCE_SPLITTERS)})")
        try:
            import sentencex
        except ImportError:
            raise MissingExtra(MISSING_TEXT_EXTRA.format(what="sentence splitter")) from None
        self.name, self.lang = name, lang
        self._segment = sentencex.segment

    def split(self, line: str) -> list[str]:
        """The non-blank sentences of ``line`` (the whole line when it has one)."""
        if not line or line.isspace():
            return []
        return [sentence for sentence in self._segment(self.lang, line) if not sentence.isspace()]


def valid_lang(lang) -> bool:
    """A language code as ``--lang`` takes it: letters and digits, '-' and '_' (en, de, zh-hans, pt_BR)."""
    return isinstance(lang, str) and bool(lang) and lang.replace("-", "").replace("_", "").isalnum()


def library_versions(tokenizer: str, split_sentences: Optional[str]) -> dict:
    """The versions of the libraries a pipeline tokenizes with (recorded, so a later change can be traced)."""
    from importlib.metadata import PackageNotFoundError, version

    names = (["sacremoses"] if tokenizer == "moses" else []) + ([split_sentences] if split_sentences else [])
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def split_long(tokens: list[str], max_tokens: int) -> list[list[str]]:
    """``tokens`` cut into pieces of at most ``max_tokens`` (0: no limit)."""
    if max_tokens <= 0 or len(tokens) <= max_tokens:
        return [tokens]
    return [tokens[i:i + max_tokens] for i in range(0, len(tokens), max_tokens)]


# --------------------------------------------------------------------------- the pipeline

TOKENIZER_FORMAT = "bilm-tokenizer"
TOKENIZER_FORMAT_VERSION = 2  # 2: lang, split_sentences, the moses tokenizer
# Runs of CJK (Han, kana, Hangul) characters: a whitespace model reading one has probably been
# handed unsegmented text.
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]{4,}")


@dataclass
class TextPipeline:
    """Raw text -> tokens, exactly as ``bilm prepare`` made the training data: NFKC (if it was
    on), control characters removed, each line split into sentences (if it was on), then whitespace
    split, SentencePiece pieces or Moses tokens.

    ``lang`` and ``split_sentences`` are newer fields: a pipeline saved before them has neither,
    and loads as it always behaved (no sentence splitting)."""
    tokenizer: str = "whitespace"
    nfkc: bool = False
    max_tokens_per_line: int = 0          # prepare cut longer lines into pieces (0: no limit)
    sp_model_proto: Optional[bytes] = None  # the SentencePiece model itself, so the pipeline travels whole
    lang: Optional[str] = None            # the moses tokenizer's and the sentence splitter's language
    split_sentences: Optional[str] = None  # the sentence splitter ("sentencex"); None: a line is a sentence
    # The libraries' versions when prepare ran (informational: tokenizer.json says what made the data).
    library_versions: Optional[dict] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise InputError(f"unknown tokenizer {self.tokenizer!r} (expected one of {', '.join(TOKENIZERS)})")
        if self.split_sentences is not None and self.split_sentences not in SENTENCE_SPLITTERS:
            raise InputError(f"unknown sentence splitter {self.split_sentences!r} "
                             f"(expected one of {', '.join(SENTENCE_SPLITTERS)})")
        if self.tokenizer == "sentencepiece" and not self.sp_model_proto:
            raise InputError("a sentencepiece pipeline needs its model")
        if self.lang is None and (self.tokenizer == "moses" or self.split_sentences):
            self.lang = "en"
        elif self.lang is not None and not valid_lang(self.lang):  # read from a file: a string the libraries take
            raise InputError(f"language {self.lang!r}: give a language code such as en, de, zh")
        self._impl: Optional[Tokenizer] = None
        self._splitter: Optional[SentenceSplitter] = None
        if self.tokenizer == "sentencepiece":  # parsed now: a damaged model fails where its file is known
            try:
                self._impl = SentencePieceTokenizer(model_proto=self.sp_model_proto)
            except Exception as e:  # sentencepiece raises RuntimeError for bytes it cannot parse
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"not a SentencePiece model ({reason})") from None

    @property
    def _tokenizer(self) -> Tokenizer:
        if self._impl is None:
            self._impl = (WhitespaceTokenizer() if self.tokenizer == "whitespace"
                          else MosesTokenizer(self.lang or "en") if self.tokenizer == "moses"
                          else SentencePieceTokenizer(model_proto=self.sp_model_proto))
        return self._impl

    def check_libraries(self) -> None:
        """Load the tokenizer and splitter now: a missing extra fails before any work."""
        self._tokenizer
        self.split_cleaned(["x"])

    def split_cleaned(self, lines: list[str]) -> list[list[str]]:
        """Each cleaned line's sentences (the line itself without a splitter)."""
        if not self.split_sentences:
            return [[line] for line in lines]
        if self._splitter is None:
            self._splitter = SentenceSplitter(self.split_sentences, self.lang or "en")
        return [self._splitter.split(line) for line in lines]

    def tokenize_cleaned(self, lines: list[str]) -> list[list[list[str]]]:
        """Cleaned lines (no newline inside) -> each line's sentences as token lists, empty ones
        dropped (a line with no token has none); not cut to ``max_tokens_per_line``."""
        if not self.split_sentences:
            return [[tokens] if tokens else [] for tokens in self._tokenizer.tokenize(lines)]
        per_line = self.split_cleaned(lines)
        flat = self._tokenizer.tokenize([sentence for sentences in per_line for sentence in sentences])
        out, start = [], 0
        for sentences in per_line:
            out.append([tokens for tokens in flat[start:start + len(sentences)] if tokens])
            start += len(sentences)
        return out

    def _clean(self, lines: list[str]) -> list[str]:
        return [clean_text(line, self.nfkc)[0].replace("\n", " ") for line in lines]

    def line_sentences(self, lines: list[str]) -> list[list[list[str]]]:
        """Each raw line's sentences as ``prepare`` made them: split (if it split), tokenized, empty
        ones dropped, long ones cut. What ``bilm evaluate`` and ``bilm score`` read."""
        return [[piece for tokens in sentences for piece in split_long(tokens, self.max_tokens_per_line)]
                for sentences in self.tokenize_cleaned(self._clean(lines))]

    def tokenize_lines(self, lines: list[str]) -> list[list[str]]:
        """One token list per line (a line that cleans to nothing gives an empty list): with sentence
        splitting, the tokens of its sentences one after the other, as each was tokenized in training."""
        return [[token for tokens in sentences for token in tokens]
                for sentences in self.tokenize_cleaned(self._clean(lines))]

    def tokenize(self, line: str) -> list[str]:
        return self.tokenize_lines([line])[0]

    def sentences(self, lines: Iterable[str]) -> Iterable[list[str]]:
        """The sentences ``prepare`` made of these lines: split, empty ones dropped, long ones cut."""
        for sentences in self.line_sentences(list(lines)):
            yield from sentences

    def describe(self) -> dict:
        """The content of ``tokenizer.json`` (format version 1 unless a newer field is in use, so
        that a file an older bilm can apply stays readable by it)."""
        newer = self.tokenizer == "moses" or bool(self.split_sentences)
        out = {"format": TOKENIZER_FORMAT, "format_version": 2 if newer else 1, "tokenizer": self.tokenizer,
               "nfkc": self.nfkc, "control_characters": "removed", "max_tokens_per_line": self.max_tokens_per_line}
        if self.tokenizer == "sentencepiece":
            out["sentencepiece_model"] = SP_MODEL_FILE
        if newer:
            out["lang"] = self.lang
            out["split_sentences"] = self.split_sentences
            if self.tokenizer == "moses":
                out["moses"] = {"library": "sacremoses", "escape": False, "aggressive_dash_splits": False}
            if self.library_versions:
                out["library_versions"] = dict(self.library_versions)
        return out

    # ----- persistence -----
    def to_state(self) -> dict:
        """Plain values (the SentencePiece model as bytes) for a checkpoint."""
        return {**self.describe(), "sp_model_proto": self.sp_model_proto}

    @classmethod
    def _from_spec(cls, spec: dict, proto: Optional[bytes]) -> "TextPipeline":
        """Fields a missing entry of which means the behaviour of a bilm before them."""
        version = spec.get("format_version", 1)
        if isinstance(version, int) and version > TOKENIZER_FORMAT_VERSION:
            raise InputError(f"tokenizer format version {version} was written by a newer bilm (this one reads "
                             f"up to {TOKENIZER_FORMAT_VERSION}): upgrade bilm")
        versions = spec.get("library_versions")
        return cls(spec.get("tokenizer", "whitespace"), bool(spec.get("nfkc", False)),
                   int(spec.get("max_tokens_per_line", 0)), proto, spec.get("lang"), spec.get("split_sentences"),
                   dict(versions) if isinstance(versions, dict) else None)

    @classmethod
    def from_state(cls, state: dict) -> "TextPipeline":
        return cls._from_spec(state, state.get("sp_model_proto"))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "TextPipeline":
        """The pipeline ``bilm prepare`` recorded (``bilm.data.load_manifest`` made its paths absolute)."""
        source = manifest.get("path") or os.path.join(manifest.get("dir", ""), "manifest.json")
        tokenizer = manifest.get("tokenizer") or {"type": "whitespace"}
        normalization = manifest.get("normalization") or {}
        splitter = manifest.get("sentence_splitter") or {}
        if not isinstance(tokenizer, dict) or not isinstance(normalization, dict) or not isinstance(splitter, dict):
            raise InputError(f"{source}: keys 'tokenizer', 'normalization' and 'sentence_splitter' must be JSON "
                             "objects")
        proto = None
        if tokenizer.get("type") == "sentencepiece":
            model = tokenizer.get("model")
            if not isinstance(model, str):
                raise InputError(f"{source}: key 'tokenizer.model' must name the SentencePiece model file")
            try:
                with open(model, "rb") as f:
                    proto = f.read()
            except OSError as e:
                raise FileNotFoundError(f"{source} names the SentencePiece model {model}, which cannot be read "
                                        f"({e.strerror or e})") from None
        versions = {}  # informational: only what is a mapping
        for entry in (tokenizer, splitter):
            if isinstance(entry.get("library_versions"), dict):
                versions.update(entry["library_versions"])
        try:
            return cls(tokenizer.get("type", "whitespace"), bool(normalization.get("nfkc", False)),
                       int(normalization.get("max_tokens_per_line", 0)), proto,
                       tokenizer.get("lang") or splitter.get("lang"), splitter.get("type"), versions or None)
        except (ValueError, TypeError) as e:
            where = tokenizer["model"] if proto is not None and str(e).startswith("not a SentencePiece") else source
            raise InputError(f"{where}: {e}") from None

    def save(self, directory: str) -> list[str]:
        """Write ``tokenizer.json`` (and ``sentencepiece.model``) into ``directory``; returns the names."""
        names = [TOKENIZER_FILE]
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(self.describe(), f, indent=2)
            f.write("\n")
        if self.tokenizer == "sentencepiece":
            with open(os.path.join(directory, SP_MODEL_FILE), "wb") as f:
                f.write(self.sp_model_proto)
            names.append(SP_MODEL_FILE)
        return names

    @classmethod
    def load(cls, directory: str) -> Optional["TextPipeline"]:
        """The pipeline saved in ``directory``, or None when it has no ``tokenizer.json``."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            return None

        spec = read_json(path)
        if not isinstance(spec, dict) or spec.get("format") != TOKENIZER_FORMAT:
            raise InputError(f"{path}: not a bilm tokenizer description (key 'format' should be {TOKENIZER_FORMAT!r})")
        proto = None
        if spec.get("tokenizer") == "sentencepiece":
            model = os.path.join(directory, spec.get("sentencepiece_model", SP_MODEL_FILE))
            try:
                with open(model, "rb") as f:
                    proto = f.read()
            except (OSError, TypeError) as e:
                raise FileNotFoundError(f"{path} names the SentencePiece model {model!r}, which cannot be read "
                                        f"({getattr(e, 'strerror', None) or e})") from None
            if not proto:
                raise InputError(f"{model}: empty file (the SentencePiece model {path} names)")
        try:
            return cls._from_spec(spec, proto)
        except (ValueError, TypeError) as e:
            where = model if proto is not None and str(e).startswith("not a SentencePiece") else path
            raise InputError(f"{where}: {e}") from None

    # ----- input checks -----
    def suspicious(self, tokens: list[str], max_characters: int = 50) -> Optional[str]:
        """Why a whitespace model probably got text it cannot read well, or None."""
        if self.tokenizer != "whitespace":
            return None
        for token in tokens:
            if _CJK_RUN.search(token):
                return f"token {token[:20]!r} is a run of CJK characters without spaces"
            if len(token.encode("utf-8")) > max_characters - 2:
                return f"token {token[:20]!r}... is longer than the char CNN reads ({max_characters - 2} bytes)"
        return None


def warn_suspicious_lines(pipeline: TextPipeline, tokenized: Iterable[tuple[int, list[str]]], source: str,
                          max_characters: int = 50) -> None:
    """One warning for a file whose lines a whitespace model cannot read well (first line named)."""
    import warnings

    first, count = None, 0
    for line_number, tokens in tokenized:
        reason = pipeline.suspicious(tokens, max_characters)
        if reason is not None:
            count += 1
            first = first or (line_number, reason)
    if first is not None:
        warnings.warn(f"{source}, line {first[0]}: {first[1]} ({count} such line{'s' if count > 1 else ''}); "
                      "this model splits on whitespace: for unsegmented text (e.g. Chinese) train with "
                      "`bilm prepare --tokenizer sentencepiece`", stacklevel=2)
