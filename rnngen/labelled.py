"""Reading labelled data for classification: CSV/TSV, JSONL and class folders; a stratified split.

Formats (auto-detected from the path, or named with ``fmt``):

- ``csv`` / ``tsv``: ``.csv``, ``.tsv``, ``.tab`` (other extensions: the delimiter is sniffed). With a
  header, columns are named (case-insensitively); without one they are 1-based numbers.
- ``jsonl``: ``.jsonl``, ``.ndjson``; one object per line holding the text and label keys.
- ``class-files``: a folder with one file per class (label = file stem), one example per line.
- ``class-folders``: a folder with one sub-folder per class (label = its name), one document per file.

A bad row raises InputError naming the file and line, or with ``skip_bad_rows`` is skipped and
counted under its reason. Integer labels 1..N are read as class names when a ``classes.txt`` listing
N names sits beside a file (as in AG News).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .corpora import check_readable_file
from .errors import InputError

FORMATS = ("csv", "tsv", "jsonl", "class-files", "class-folders")
FOLDER_FORMATS = ("class-files", "class-folders")
DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")

Column = str | int  # a header name, or a 1-based column number
# Bytes the encoding cannot decode are read as lone surrogates (errors="surrogateescape"), so a bad
# row can be found, named and skipped on its own instead of failing the whole file.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_NEWLINE = re.compile(r"\r\n|\r|\n")  # not str.splitlines: that also splits at \x0c, \u2028 ...


@dataclass
class LabelledData:
    """Texts and their labels, with the bookkeeping of how they were read."""

    texts: list[str]
    labels: list[str]
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows skipped
    skipped_first: dict[str, str] = field(default_factory=dict)  # reason -> message for its first row
    duplicates_removed: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted (numerically when every label is an integer)."""
        labels = set(self.labels)
        if all(_is_int(label) for label in labels):
            return sorted(labels, key=lambda label: (int(label), label))
        return sorted(labels)

    def counts(self) -> dict[str, int]:
        """Examples per class, in class order."""
        counter = Counter(self.labels)
        return {label: counter[label] for label in self.classes}

    def label_ids(self, classes: Sequence[str] | None = None) -> list[int]:
        """Each label's index in ``classes`` (default: this data's own classes)."""
        index = {label: i for i, label in enumerate(classes if classes is not None else self.classes)}
        unknown = sorted(set(self.labels) - index.keys())
        if unknown:
            raise InputError(f"label(s) {', '.join(map(repr, unknown[:5]))} are not among the model's classes "
                             f"({', '.join(index)}); use data with the classes the model was trained on")
        return [index[label] for label in self.labels]

    def subset(self, indices: Iterable[int]) -> LabelledData:
        """The examples at ``indices``, keeping the reading bookkeeping."""
        indices = list(indices)
        return LabelledData([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                            Counter(self.skipped), dict(self.skipped_first), self.duplicates_removed)

    def skipped_summary(self) -> str:
        """E.g. ``3 bad rows skipped (2 empty text, 1 missing label)``; empty when none was."""
        if not self.skipped:
            return ""
        total = sum(self.skipped.values())
        parts = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{total} bad row{'s' * (total != 1)} skipped ({parts})"


@dataclass(frozen=True)
class ReadConfig:
    """How labelled data is read (the options of ``read_labelled``)."""

    fmt: str | None = None  # None: from the path
    text_columns: tuple[Column, ...] = ("text",)
    label_column: Column = "label"
    header: bool = True
    encoding: str = "utf-8"
    skip_bad_rows: bool = False


def parse_columns(spec: str) -> list[Column]:
    """``"title,description"`` -> names; ``"2,3"`` -> 1-based column numbers (the CLI's column options)."""
    parts = [part.strip() for part in spec.split(",")]
    if not all(parts):
        raise InputError(f"empty column name in {spec!r}; give names or numbers separated by commas, "
                         "e.g. title,description or 2,3")
    if not all(part.isascii() and part.isdigit() for part in parts):
        return [*parts]
    if any(int(part) == 0 for part in parts):
        raise InputError(f"column numbers start at 1, not 0 (in {spec!r})")
    return [int(part) for part in parts]


def read_labelled(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, fmt: str | None = None,
                  text_columns: Column | Sequence[Column] = ("text",), label_column: Column = "label",
                  header: bool = True, encoding: str = "utf-8", skip_bad_rows: bool = False,
                  min_classes: int = 2) -> LabelledData:
    """Read labelled examples from files and folders (concatenated in the order given).

    ``text_columns`` (several are joined with a space) and ``label_column`` name CSV/TSV columns or
    JSONL keys; ``header=False`` reads CSV/TSV without a header, columns then given by number.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1") from None
    texts = [text_columns] if isinstance(text_columns, (str, int)) else list(text_columns)
    if not texts:
        raise InputError("no text column given; name at least one with --text-column")
    rows = _Rows(skip_bad_rows, encoding)
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"data not found: {path}; check the path")
        kind = fmt or _detect_format(path)
        start, skipped_before = len(rows.labels), rows.skipped_total
        if path.is_dir():
            if kind not in FOLDER_FORMATS:
                raise InputError(f"{path} is a folder, but --format {kind} reads a file; "
                                 "pass the file, or --format class-files or class-folders")
            _read_folder(path, kind, rows)
        else:
            if kind in FOLDER_FORMATS:
                raise InputError(f"--format {kind} reads a folder, but {path} is a file; pass a folder")
            check_readable_file(path, "data file")
            if kind == "jsonl":
                _read_jsonl(path, texts, label_column, rows)
            else:
                # an explicit format sets the delimiter; else the extension does, or it is sniffed
                delimiter = {"csv": ",", "tsv": "\t"}[fmt] if fmt else DELIMITERS.get(path.suffix.lower())
                _read_delimited(path, delimiter, texts, label_column, header, rows)
            _name_classes(path, rows.labels, start, encoding)
        if len(rows.labels) == start and rows.skipped_total == skipped_before:
            raise InputError(f"{path} holds no examples; pass data with labelled examples in it")
    data = LabelledData(rows.texts, rows.labels, rows.skipped, rows.skipped_first)
    where = ", ".join(map(str, paths))
    if not data.texts:
        raise InputError(f"no usable rows in {where}: {data.skipped_summary()}; "
                         f"the first: {next(iter(data.skipped_first.values()))}")
    if len(data.classes) < min_classes:
        found = ", ".join(map(repr, data.classes))
        raise InputError(f"{where} has only {len(data.classes)} class{'es' * (len(data.classes) != 1)} "
                         f"({found}); a classifier needs at least {min_classes}: check --label-column, "
                         "or add examples of other classes")
    return data


def deduplicate(data: LabelledData) -> LabelledData:
    """Keep the first of each repeated (text, label) pair; ``duplicates_removed`` counts the rest."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for i, pair in enumerate(zip(data.texts, data.labels)):
        if pair not in seen:
            seen.add(pair)
            keep.append(i)
    out = data.subset(keep)
    out.duplicates_removed += len(data) - len(keep)
    return out


def stratified_split(data: LabelledData, val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[LabelledData, LabelledData]:
    """De-duplicate, then hold out ``val_fraction`` of each class (seeded; the same seed, the same split).

    Every class with at least two examples gets at least one validation example and keeps at least
    one for training; a class with one example stays in training. Both halves keep the original order
    and carry ``duplicates_removed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"the validation fraction must be between 0 and 1, not {val_fraction}; "
                         "use e.g. --val-fraction 0.2")
    data = deduplicate(data)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    val: set[int] = set()
    for label in data.classes:  # a fixed order, so the seed alone decides the split
        members = by_class[label]
        if len(members) >= 2:
            n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
            val.update(rng.sample(members, n_val))
    train = [i for i in range(len(data)) if i not in val]
    return data.subset(train), data.subset(sorted(val))


class _Rows:
    """Collects examples; a bad row raises InputError, or is counted when skipping."""

    def __init__(self, skip: bool, encoding: str) -> None:
        self.skip, self.encoding = skip, encoding
        self.texts: list[str] = []
        self.labels: list[str] = []
        self.skipped: Counter[str] = Counter()
        self.skipped_first: dict[str, str] = {}

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def bad(self, reason: str, message: str) -> None:
        if not self.skip:
            raise InputError(f"{message}; fix it or pass --skip-bad-rows")
        self.skipped[reason] += 1
        self.skipped_first.setdefault(reason, message)

    def undecodable(self, where: str, *fields: str) -> bool:
        if any(_UNDECODABLE.search(f) for f in fields):
            self.bad("undecodable bytes", f"{where}: bytes that are not valid {self.encoding} "
                                          "(pass --encoding, e.g. latin-1)")
            return True
        return False

    def add(self, where: str, text: str, label: str) -> None:
        text, label = text.strip(), label.strip()
        if not label:
            self.bad("missing label", f"{where}: no label")
        elif not text:
            self.bad("empty text", f"{where}: empty text")
        else:
            self.texts.append(text)
            self.labels.append(label)


def _is_int(s: str) -> bool:
    return s.removeprefix("-").isascii() and s.removeprefix("-").isdigit()


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "class-folders" if any(_visible(path, want_dirs=True)) else "class-files"
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "csv"  # csv: any delimited text


def _visible(folder: Path, want_dirs: bool) -> list[Path]:
    """Sub-folders or regular files of ``folder`` in name order, hidden ones (.git, .DS_Store) left out."""
    try:
        return sorted(p for p in folder.iterdir()
                      if not p.name.startswith(".") and (p.is_dir() if want_dirs else p.is_file()))
    except OSError as exc:
        raise InputError(f"cannot read folder {folder}: {exc.strerror}") from None


def _decode(path: Path, encoding: str) -> str:
    """The text of ``path``; bytes the encoding cannot decode become lone surrogates (see _UNDECODABLE)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    name = codecs.lookup(encoding).name
    wide = name.startswith(("utf-16", "utf-32"))
    if not wide and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path} looks like UTF-16 (it starts with a byte-order mark); pass --encoding utf-16")
    nul = -1 if wide else raw.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path} contains NUL bytes (at byte {nul}): it looks binary; pass a text file")
    try:  # a UTF-8 byte-order mark (as spreadsheets write) is not text
        return raw.decode("utf-8-sig" if name == "utf-8" else encoding, errors="surrogateescape")
    except UnicodeDecodeError as exc:  # surrogateescape cannot stand in for every bad byte (e.g. in UTF-16)
        raise InputError(f"{path} is not valid {encoding} at byte {exc.start}; pass --encoding ENC") from None


def _read_folder(folder: Path, kind: str, rows: _Rows) -> None:
    if kind == "class-files":
        files = _visible(folder, want_dirs=False)
        if not files:
            raise InputError(f"{folder} holds no files; pass a folder with one file per class (one example a line)")
        for path in files:
            check_readable_file(path, "class file")
            for n, line in enumerate(_NEWLINE.split(_decode(path, rows.encoding)), 1):
                where = f"{path} line {n}"
                if line.strip() and not rows.undecodable(where, line):
                    rows.add(where, line, path.stem)
        return
    classes = _visible(folder, want_dirs=True)
    if not classes:
        raise InputError(f"{folder} holds no sub-folders; pass a folder with one sub-folder per class")
    for class_dir in classes:
        for path in _visible(class_dir, want_dirs=False):
            text = _decode(path, rows.encoding)
            if not rows.undecodable(str(path), text):
                rows.add(str(path), text, class_dir.name)


def _read_delimited(path: Path, delimiter: str | None, text_columns: list[Column], label_column: Column,
                    header: bool, rows: _Rows) -> None:
    text = _decode(path, rows.encoding)
    if delimiter is None:
        delimiter = _sniff_delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    width, first, picks, line = 0, "", [0], 1  # picks: indices of the text columns, then of the label
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record:  # a blank line
                continue
            where = f"{path} line {start}"
            if not width:
                width, first = len(record), "the header" if header else f"line {start}"
                picks = [_column_index(path, col, record if header else None, width)
                         for col in (*text_columns, label_column)]
                if header:
                    continue
            if len(record) != width:
                rows.bad("wrong column count", f"{where}: {len(record)} columns where {first} has {width} (check "
                         "the quoting: a field holding the delimiter, a newline or a quote goes in double quotes)")
            elif not rows.undecodable(where, *record):
                parts = (record[i].strip() for i in picks[:-1])
                rows.add(where, " ".join(part for part in parts if part), record[picks[-1]])
    except csv.Error as exc:
        raise InputError(f"{path} line {line}: {exc}; check the quoting") from None


def _sniff_delimiter(path: Path, text: str) -> str:
    sample = text[: 1 << 16]
    try:
        return csv.Sniffer().sniff(sample[: sample.rfind("\n") + 1] or sample, delimiters=",\t;|").delimiter
    except csv.Error:
        raise InputError(f"cannot tell the delimiter of {path}; pass --format csv or --format tsv") from None


def _column_index(path: Path, column: Column, header: list[str] | None, width: int) -> int:
    """The 0-based index of ``column`` (a number, or a name looked up in ``header``)."""
    if isinstance(column, int):
        if not 1 <= column <= width:
            raise InputError(f"{path} has {width} columns, so there is no column {column}; "
                             "give column numbers from 1")
        return column - 1
    if header is None:
        raise InputError(f"{path} is read without a header, so columns are numbers, not names like {column!r}; "
                         "e.g. --text-column 2,3 --label-column 1")
    names = [name.strip() for name in header]
    folded = [name.casefold() for name in names]
    if column in names:
        return names.index(column)
    if column.casefold() in folded:
        return folded.index(column.casefold())
    shown = ", ".join(repr(name[:30]) for name in names[:12]) + (", ..." if len(names) > 12 else "")
    raise InputError(f"{path}: the header has no column {column!r} (its columns: {shown}); name the columns "
                     "with --text-column/--label-column, or pass --no-header and give column numbers")


def _read_jsonl(path: Path, text_keys: list[Column], label_key: Column, rows: _Rows) -> None:
    if any(isinstance(key, int) for key in (*text_keys, label_key)):
        raise InputError(f"{path} is JSON Lines: name its keys (e.g. --text-column text), not column numbers")
    for n, line in enumerate(_NEWLINE.split(_decode(path, rows.encoding)), 1):
        where = f"{path} line {n}"
        if not line.strip() or rows.undecodable(where, line):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.bad("invalid JSON", f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")
            rows.bad("not a JSON object", f"{where}: a JSON {kind} where an object "
                     "like {\"text\": ..., \"label\": ...} belongs")
            continue
        missing = [key for key in (*text_keys, label_key) if key not in obj]
        if missing:
            keys = ", ".join(map(repr, list(obj)[:12]))
            rows.bad("missing label" if missing[0] == label_key else "missing key",
                     f"{where}: no key {missing[0]!r} (its keys: {keys}); "
                     "name the keys with --text-column/--label-column")
            continue
        values = [obj[key] for key in (*text_keys, label_key)]
        if any(isinstance(v, (list, dict)) for v in values):
            rows.bad("not a string", f"{where}: a JSON list or object where a text or label belongs")
            continue
        strings = [v if isinstance(v, str) else "" if v is None else json.dumps(v) for v in values]
        parts = (s.strip() for s in strings[:-1])
        rows.add(where, " ".join(part for part in parts if part), strings[-1])


def _name_classes(path: Path, labels: list[str], start: int, encoding: str) -> None:
    """Replace integer labels 1..N read from ``path`` by the names in a ``classes.txt`` beside it."""
    names_file = path.with_name("classes.txt")
    if path.name == "classes.txt" or not names_file.is_file():
        return
    names = [line.strip() for line in _NEWLINE.split(_decode(names_file, encoding)) if line.strip()]
    ours = labels[start:]
    if ours and all(label.isascii() and label.isdigit() and 1 <= int(label) <= len(names) for label in ours):
        labels[start:] = [names[int(label) - 1] for label in ours]
