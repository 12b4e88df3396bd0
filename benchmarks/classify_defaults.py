"""Good by default, classification: `rnngen classify train TRAIN --max-time T` with no other flag, scored on a
held-out test split with `rnngen classify eval`, beside a linear baseline (TF-IDF + logistic regression, the
better of word 1-2-grams and character 1-4-grams, scikit-learn) on the same split. Alone on the machine.

    python benchmarks/classify_defaults.py                              # every data set at its budget
    python benchmarks/classify_defaults.py --sets manpages --budget 300
    python benchmarks/classify_defaults.py --sets agnews -- --max-epochs 5   # extra `classify train` options

Data sets (each skipped, with the reason, when it cannot be had here):
  agnews     ../shared/data/ag_news/test.csv: title + description (short news texts, 4 topics); rows with
             index % 5 == 0 are the test set (1,520), the others train (6,080). Budget 1,800 s.
  names      ../shared/data/names: surnames, 18 languages; 80/20 stratified split, seed 0. Budget 300 s.
  manpages   long documents: Linux man pages (Debian's manpages and manpages-dev, `apt-get download`; their
             licences are in the packages), rendered by groff to plain text without the header and footer
             lines that name the section; the label is the section: 2 system calls, 3 library functions
             (a fixed random 600 of them), 4-5 devices and file formats, 7 overviews; pages of 1,500
             characters or more; 80/20 stratified split, seed 0. Budget 300 s.
  code       data/code_or_prose.csv (in the repository: Python, C or English prose, one line each); 80/20
             stratified split, seed 0. Budget 120 s.

Needs scikit-learn for the baseline (`pip install scikit-learn`); without it the baseline is skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, each_available, rnngen, save  # noqa: E402

from rnngen.labelled import LabelledData, read_labelled, stratified_split  # noqa: E402

SETS = {"agnews": 1800.0, "names": 300.0, "manpages": 300.0, "code": 120.0}
SECTIONS = {"2": "system call", "3": "library function", "4": "device or file format", "5": "device or file format",
            "7": "overview"}


def man_pages(work: Path) -> LabelledData | None:
    """The rendered man pages and their sections, or None (and a reason printed) where they cannot be had."""
    root = work / "manpages"
    if not (root / "x").exists():
        root.mkdir(parents=True, exist_ok=True)
        got = subprocess.run("apt-get download manpages manpages-dev && for d in *.deb; do dpkg-deb -x $d x; done",
                             shell=True, cwd=root, capture_output=True, text=True)
        if got.returncode != 0:
            print(f"skipped manpages: {got.stderr.strip()[-200:]}", flush=True)
            return None
    pages: dict[str, list[str]] = {}
    for section in SECTIONS:
        for path in sorted((root / "x" / "usr" / "share" / "man" / f"man{section}").glob("*.gz")):
            source = gzip.decompress(path.read_bytes())
            if source.startswith(b".so "):  # an alias of another page
                continue
            rendered = subprocess.run(["groff", "-Tutf8", "-man", "-P", "-cbou"], input=source, capture_output=True)
            lines = rendered.stdout.decode("utf-8", "replace").strip("\n").splitlines()
            text = "\n".join(lines[1:-1]).strip()  # the header and footer name the section
            if len(text) >= 1500:
                pages.setdefault(SECTIONS[section], []).append(text)
    random.Random(0).shuffle(pages["library function"])
    pages["library function"] = pages["library function"][:600]
    texts = [t for label in sorted(pages) for t in pages[label]]
    labels = [label for label in sorted(pages) for _ in pages[label]]
    return LabelledData(texts, labels)


def split(name: str, work: Path) -> tuple[LabelledData, LabelledData] | None:
    if name == "agnews":
        path = SHARED / "data" / "ag_news" / "test.csv"
        if not path.exists():
            return None
        data = read_labelled([path], header=False, text_columns=[2, 3], label_column=1)
        parts: dict[bool, tuple[list[str], list[str]]] = {True: ([], []), False: ([], [])}
        for i, (text, label) in enumerate(zip(data.texts, data.labels)):
            parts[i % 5 == 0][0].append(text)
            parts[i % 5 == 0][1].append(label)
        return LabelledData(*parts[False]), LabelledData(*parts[True])
    if name == "names":
        if not (SHARED / "data" / "names").is_dir():
            return None
        return stratified_split(read_labelled([SHARED / "data" / "names"]), 0.2, 0)
    if name == "manpages":
        data = man_pages(work)
        return stratified_split(data, 0.2, 0) if data else None
    if name == "code":
        return stratified_split(read_labelled([ROOT / "data" / "code_or_prose.csv"]), 0.2, 0)
    raise SystemExit(f"unknown data set {name!r}: use {', '.join(SETS)}")


def write_jsonl(data: LabelledData, path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n"
                            for t, label in zip(data.texts, data.labels)), encoding="utf-8")
    return path


def baseline(train: LabelledData, test: LabelledData) -> dict[str, float] | None:
    """TF-IDF + L2-regularised logistic regression: word 1-2-grams and character 1-4-grams, each scored."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        print("baseline skipped: scikit-learn is not installed", flush=True)
        return None
    scores = {}
    for kind, options in {"word_1_2": {"analyzer": "word", "ngram_range": (1, 2)},
                          "char_1_4": {"analyzer": "char_wb", "ngram_range": (1, 4)}}.items():
        vectorizer = TfidfVectorizer(lowercase=True, sublinear_tf=True, **options)
        x = vectorizer.fit_transform(train.texts)
        model = LogisticRegression(C=10.0, max_iter=2000).fit(x, train.labels)
        scores[kind] = round(float((model.predict(vectorizer.transform(test.texts)) == test.labels).mean()), 4)
    return scores


def run_rnngen(train: Path, test: Path, out: Path, seconds: float, extra: list[str]) -> dict:
    started = time.perf_counter()
    rnngen("classify", "train", str(train), "--out", str(out), "--max-time", str(seconds), *extra, "--quiet")
    wall = time.perf_counter() - started
    result = json.loads(rnngen("classify", "eval", str(out), str(test), "--json"))
    config = json.loads((out / "best" / "config.json").read_text())
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4),
            "seconds": round(wall, 1), "chosen": config.get("training", {}).get("chosen", {}).get("line", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--budget", type=float, help="seconds for every set (default: each set's own)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("extra", nargs="*", help="options for `rnngen classify train` (after --)")
    a = p.parse_args()
    cells = []
    for name, (train, test), _ in each_available(a.sets, split):
        seconds = a.budget or SETS[name]
        with tempfile.TemporaryDirectory() as tmp:
            cell = {"set": name, "train": len(train), "test": len(test), "classes": len(set(train.labels)),
                    "median_chars": sorted(len(t) for t in train.texts)[len(train) // 2], "seconds": seconds,
                    "rnngen": run_rnngen(write_jsonl(train, Path(tmp) / "train.jsonl"),
                                         write_jsonl(test, Path(tmp) / "test.jsonl"), Path(tmp) / "run",
                                         seconds, a.extra)}
        if not a.no_baseline:
            cell["baseline"] = baseline(train, test)
            if cell["baseline"]:
                cell["above_baseline_by"] = round(cell["rnngen"]["accuracy"] - max(cell["baseline"].values()), 4)
        cells.append(cell)
        print(json.dumps(cell, ensure_ascii=False), flush=True)
    print(f"saved {save('classify_defaults', {'cells': cells, 'options': a.extra})}")


if __name__ == "__main__":
    main()
