"""Reading corpora: checked files, streaming decoding, the built-in corpus and named data sets."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

CHUNK_BYTES = 1 << 22


def cache_dir() -> Path:
    """Where rnngen caches token files and downloads (RNNGEN_CACHE_DIR, else the XDG cache)."""
    root = os.environ.get("RNNGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "rnngen")
    return Path(root)


def check_readable_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` if it is a readable, non-empty regular file, else raise a one-line InputError."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {p}; check the path") from None
    except OSError as exc:
        raise InputError(f"cannot access {what} {p}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p} is a directory; pass a text file (or several) instead")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p} is not a regular file (a FIFO, socket or device?); pass a text file")
    if not os.access(p, os.R_OK):
        raise InputError(f"permission denied reading {p}; fix its permissions (chmod +r) or copy it")
    if st.st_size == 0:
        raise InputError(f"{what} {p} is empty; pass a file with text in it")
    return p


def _check_start(path: Path, head: bytes, encoding: str) -> None:
    if codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig", "ascii", "latin-1", "iso8859-1", "cp1252"):
        return
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path} looks like UTF-16 (it starts with a byte-order mark); pass --encoding utf-16")


def iter_file_text(path: Path, encoding: str = "utf-8", errors: str = "strict",
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode ``path`` chunk by chunk; bad bytes raise InputError with their byte offset."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # a UTF-8 byte-order mark is not text
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict" if errors == "strict" else errors)
    single_byte_nul_check = codecs.lookup(encoding).name not in ("utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                                                 "utf-32-le", "utf-32-be")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_bytes)
                if offset == 0:
                    _check_start(path, raw, encoding)
                if single_byte_nul_check and b"\x00" in raw:
                    where = offset + raw.index(b"\x00")
                    raise InputError(f"{path} contains NUL bytes (at byte {where}): it looks binary; pass a text file")
                buffered = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    where = offset - buffered + exc.start
                    raise InputError(f"{path} is not valid {encoding.removesuffix('-sig')} at byte {where}; "
                                     "pass --encoding ENC, or --errors replace to substitute bad bytes") from None
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Corpus:
    """One or more text sources read as a single stream (files joined by newlines)."""

    paths: tuple[Path, ...]
    encoding: str = "utf-8"
    errors: str = "strict"
    name: str = ""

    def chunks(self) -> Iterator[str]:
        ends_with_newline, has_text = True, False
        for path in self.paths:
            if not ends_with_newline:
                yield "\n"
            for text in iter_file_text(path, self.encoding, self.errors):
                has_text = has_text or not text.isspace()
                yield text
                ends_with_newline = text.endswith("\n")
        if not has_text:
            raise InputError(f"{self.describe()} holds only whitespace; pass a file with text in it")

    def read(self) -> str:
        return "".join(self.chunks())

    def fingerprint(self) -> str:
        """A content hash of the sources and how they are read (keys the token cache)."""
        h = hashlib.sha256(f"{self.encoding}|{self.errors}|{len(self.paths)}".encode())
        for path in self.paths:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            h.update(b"\x00|")
        return h.hexdigest()

    def describe(self) -> str:
        """A short name for messages and checkpoints (file names only: no absolute paths are stored)."""
        return self.name or ", ".join(p.name for p in self.paths)


def _prose_or_code(line: str) -> bool:
    """False for the help pages' tables (their borders and padded rows) and rules under headings: a model
    trained on them writes runs of dashes and spaces, not text."""
    s = line.strip()
    return not (s[:1] in ("+", "|") or (s and sum(c in "-=+|*~^" for c in s) >= len(s) / 2))


def _page_text(page: str) -> str:
    """One help page as the built-in corpus keeps it: prose and code examples, without tables, heading rules and
    grammar productions ("::=" and their continuation lines); each indented block moved to the margin, what is
    indented within it (code) by a tab per level; runs of spaces inside a line (columns aligned for the eye)
    made two. Why: sampled cold at a low temperature, a model trained on the pages as they were wrote nothing
    but spaces. Half their lines began with two to twenty spaces, and a model of a few minutes cannot count
    them: after four, it still gave another space 61% (measured), so it never left a run it started. A level
    of indentation is now one character, and a line never starts with a space."""
    kept: list[str] = []
    block: list[str] = []  # a run of indented lines (blank lines inside it kept)
    in_grammar = False

    def flush() -> None:
        indent = min((len(line) - len(line.lstrip(" ")) for line in block if line.strip()), default=0)
        kept.extend("\t" * -((indent - len(line) + len(line.lstrip(" "))) // INDENT_WIDTH) + line.lstrip(" ")
                    for line in block)
        block.clear()

    for line in page.strip().splitlines():
        indented = line.startswith(" ")
        in_grammar = "::=" in line or (in_grammar and indented and line.strip() != "")
        if in_grammar or not _prose_or_code(line):
            continue
        line = line[:len(line) - len(line.lstrip(" "))] + _INNER_SPACES.sub("  ", line.lstrip(" "))
        if indented or (block and not line.strip()):
            block.append(line)
        else:
            flush()
            kept.append(line)
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept))  # one blank line where a production was dropped


_INNER_SPACES = re.compile(r"(?<=\S) {3,}")
INDENT_WIDTH = 4  # spaces a tab of the built-in corpus stands for (rounded up: the pages indent by 2-4)


def builtin_text() -> str:
    """The built-in corpus: Python's interactive help topics (about 0.4 MB of English prose and code examples),
    cleaned for a language model (see ``_page_text``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise InputError("this Python has no pydoc_data, so there is no built-in corpus; pass a text file") from None
    return "\n\n".join(_page_text(topics[key]) for key in sorted(topics)) + "\n"


def builtin_corpus() -> Corpus:
    """Write the built-in corpus to the cache once and return it as a Corpus."""
    text = builtin_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / "corpora" / f"python-help-{digest}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return Corpus((path,), name="the built-in corpus (Python's help topics, "
                               f"{len(text) / 1e6:.1f} MB)")


def dataset_registry() -> dict[str, dict[str, object]]:
    with open(Path(__file__).with_name("datasets.json"), encoding="utf-8") as f:
        return json.load(f)


def fetch_dataset(name: str, registry: dict[str, dict[str, object]] | None = None) -> Path:
    """Download a named public data set once (checked against its sha256) into the cache."""
    registry = registry if registry is not None else dataset_registry()
    if name not in registry:
        raise InputError(f"unknown data set {name!r}: known ones are {', '.join(sorted(registry))}")
    entry = registry[name]
    url, sha256, filename = str(entry["url"]), str(entry["sha256"]), str(entry["filename"])
    path = cache_dir() / "datasets" / filename
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise InputError(f"could not download {name} from {url} ({reason}); "
                         "if you are offline, pass a text file instead") from None
    if "zip_members" in entry:  # a zip archive: keep the matching members, joined in name order
        data = _join_zip_members(data, str(entry["zip_members"]), name)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise InputError(f"the download of {name} has sha256 {got[:12]}…, expected {sha256[:12]}…; "
                         "try again later or pass a text file")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _join_zip_members(data: bytes, pattern: str, name: str) -> bytes:
    import fnmatch
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = sorted(m for m in archive.namelist() if fnmatch.fnmatch(m, pattern))
            return b"".join(archive.read(m) for m in members)
    except zipfile.BadZipFile:
        raise InputError(f"the download of {name} is not a valid zip archive; try again or pass a text file") from None


def folder_files(root: Path) -> list[Path]:
    """The non-empty files in ``root`` and its sub-folders, in path order; hidden files and folders are skipped."""
    try:
        found = sorted(p for p in root.rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(root).parts) and p.is_file())
    except OSError as exc:
        raise InputError(f"cannot read the folder {root}: {exc.strerror}") from None
    found = [p for p in found if p.stat().st_size > 0]
    if not found:
        raise InputError(f"the folder {root} holds no files with text in them; pass text files, or a folder of them")
    return [check_readable_file(p, "corpus file") for p in found]


def resolve_corpus(sources: Sequence[str], encoding: str = "utf-8", errors: str = "strict",
                   what: str = "corpus file") -> Corpus:
    """Turn CLI arguments into a Corpus: files, folders (see ``folder_files``), a named data set, or the built-in
    corpus when empty. ``what`` names a file in messages."""
    if errors not in ("strict", "replace", "ignore"):
        raise InputError(f"--errors must be strict, replace or ignore, not {errors!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1") from None
    if not sources:
        return builtin_corpus()
    paths: list[Path] = []
    names = []
    registry = dataset_registry()
    for source in sources:
        if not os.path.exists(source) and source in registry:
            paths.append(fetch_dataset(source, registry))
            names.append(source)
        elif os.path.isdir(source):
            found = folder_files(Path(source))
            paths.extend(found)
            names.append(f"{Path(source).resolve().name}/ ({len(found)} files)")
        else:
            paths.append(check_readable_file(source, what))
            names.append(Path(source).name)
    return Corpus(tuple(paths), encoding, errors, name=", ".join(names))
