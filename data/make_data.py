"""Rebuild the example data sets of data/ from this machine's Python installation (no download).

    python data/make_data.py            # writes data/python_source.txt and data/code_or_prose.csv

Both come from the CPython distribution (standard library sources, C headers, the help-topic texts of
pydoc), under the Python Software Foundation License; see data/README.md. The selection is fixed (file
lists, a seeded shuffle), so the same Python version gives the same files.
"""

from __future__ import annotations

import csv
import random
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Modules of readable, typical Python: classes, docstrings, comprehensions, string handling.
SOURCE_MODULES = ["textwrap.py", "string.py", "fractions.py", "calendar.py", "dataclasses.py",
                  "heapq.py", "pprint.py", "bisect.py", "colorsys.py", "graphlib.py"]
PER_CLASS = 400  # lines per class of the labelled set
MIN_CHARS = 24  # a line shorter than this says too little to classify


def python_source() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [f"# ---- {name} ----\n" + (stdlib / name).read_text(encoding="utf-8") for name in SOURCE_MODULES]
    return "\n".join(parts)


def usable(line: str) -> bool:
    """A line with words in it, not a table border or a lone bracket."""
    stripped = line.strip()
    return len(stripped) >= MIN_CHARS and sum(c.isalpha() for c in stripped) >= len(stripped) // 2


def lines_of(texts: list[str], rng: random.Random) -> list[str]:
    lines = sorted({line.strip() for text in texts for line in text.splitlines() if usable(line)})
    rng.shuffle(lines)
    return lines[:PER_CLASS]


def first_sentences(text: str, limit: int = 160) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end >= MIN_CHARS else text[:limit].rsplit(" ", 1)[0]


def code_or_prose() -> list[tuple[str, str]]:
    """Lines of Python, lines of C and lines of English prose, labelled."""
    rng = random.Random(1)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    python = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))
              if p.name not in SOURCE_MODULES][:120]  # not the corpus's modules: the two data sets stay apart
    c = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(include.rglob("*.h"))]
    from pydoc_data.topics import topics

    # Paragraphs of text, not indented examples; each cut to its first sentence(s), about a line's length.
    prose = [first_sentences(re.sub(r"\s+", " ", paragraph)) for text in topics.values()
             for paragraph in text.split("\n\n") if not paragraph.startswith((" ", "\t"))]
    rows = [(line, label) for label, texts in (("python", python), ("c", c), ("prose", prose))
            for line in lines_of(texts, rng)]
    rng.shuffle(rows)
    return rows


def main() -> None:
    (HERE / "python_source.txt").write_text(python_source(), encoding="utf-8")
    with open(HERE / "code_or_prose.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(code_or_prose())
    print(f"wrote data/python_source.txt and data/code_or_prose.csv from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
