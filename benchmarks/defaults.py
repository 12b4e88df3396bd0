"""Good by default: `rnngen train CORPUS --max-time T` with no other flag, against ../shared/bench/ref_charlstm.py
(2x256 nn.LSTM, Adam at a constant 2e-3, random windows, fp32) for the same T, on corpora of different kinds.

Both hold out the last 10% of the characters and are scored on it by the reference's protocol: windows of 512
tokens, each read from a fresh state, nats per character (for a subword model, the nats of the tokens over the
characters they spell). One run after the other, alone on the machine.

    python benchmarks/defaults.py                          # every corpus at 60 s and 300 s
    python benchmarks/defaults.py --budgets 1200 --corpora tinyshakespeare,python
    python benchmarks/defaults.py --budgets 60 --corpora names --no-ref   # rnngen alone, a quick look
    python benchmarks/defaults.py --budgets 60 --corpora agnews --no-ref --flags "--batch-size 32"  # a what-if

Corpora (each skipped, with the reason, when it cannot be had here):
  tinyshakespeare  ../shared/data/tinyshakespeare.txt (verse drama, 1.1 MB)
  builtin          the built-in corpus (Python's help pages, prose and code examples)
  names            ../shared/data/names/*.txt (one short line each: surnames)
  agnews           ../shared/data/ag_news/test.csv, title and description of each article (news prose)
  python           this machine's Python standard library, its first 2 MB of .py files in path order (code)
  chinese          Debian's fortunes-zh, file `chinese` (GPL-3.0+; `apt-get download fortunes-zh`), colour codes
                   and separators removed (a non-Latin script: thousands of distinct characters)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, each_available, json_lines, save  # noqa: E402

CORPORA = ("tinyshakespeare", "builtin", "names", "agnews", "python", "chinese")
WINDOW = 512


def corpus_text(name: str, work: Path) -> str | None:
    """The corpus's text, or None (and a reason printed) where it cannot be had."""
    if name == "tinyshakespeare":
        path = SHARED / "data" / "tinyshakespeare.txt"
        return path.read_text(encoding="utf-8") if path.exists() else None
    if name == "builtin":
        from rnngen.corpora import builtin_text

        return builtin_text()
    if name == "names":
        files = sorted((SHARED / "data" / "names").glob("*.txt"))
        return "".join(f.read_text(encoding="utf-8") for f in files) if files else None
    if name == "agnews":
        path = SHARED / "data" / "ag_news" / "test.csv"
        if not path.exists():
            return None
        with open(path, encoding="utf-8", newline="") as f:
            return "".join(f"{title}\n{text}\n\n" for _, title, text in csv.reader(f))
    if name == "python":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        text, size = [], 0
        for f in files:
            part = f.read_text(encoding="utf-8", errors="replace")
            text.append(part)
            size += len(part)
            if size >= 2_000_000:
                break
        return "\n".join(text)
    if name == "chinese":
        deb = work / "fortunes-zh"
        if not deb.exists():
            deb.mkdir(parents=True)
            got = subprocess.run("apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_*.deb x", shell=True,
                                 cwd=deb, capture_output=True, text=True)
            if got.returncode != 0:
                print(f"skipped chinese: {got.stderr.strip()[-200:]}", flush=True)
                return None
        path = next(deb.glob("x/usr/share/games/fortunes/chinese"), None)
        if path is None:
            return None
        raw = path.read_text(encoding="utf-8", errors="replace")
        return re.sub(r"\x1b\[[0-9;]*m", "", raw).replace("\n%\n", "\n\n")
    raise SystemExit(f"unknown corpus {name!r}: use {', '.join(CORPORA)}")


def held_out_nats_per_char(run: Path, text: str) -> float:
    """The reference's protocol on rnngen's model: the last 10% of the characters, windows of 512 tokens, each
    from a fresh state; nats over characters."""
    import rnngen

    model = rnngen.load(str(run))
    val_text = text[int(0.9 * len(text)):]
    tokens = torch.from_numpy(model.tokenizer.encode(val_text).astype("int64"))
    total, scored_chars = 0.0, 0
    lengths = torch.from_numpy(model.tokenizer.char_lengths().astype("int64"))
    with torch.no_grad():
        for i in range(0, len(tokens) - WINDOW - 1, WINDOW):
            x, y = tokens[i:i + WINDOW].unsqueeze(0), tokens[i + 1:i + WINDOW + 1].unsqueeze(0)
            logits, _ = model.model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            scored_chars += int(lengths[y].sum())
    return total / max(1, scored_chars)


def run_rnngen(corpus: Path, text: str, seconds: float, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(run), "--max-time", str(seconds),
               "--json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        result = json.loads(proc.stdout)
        chosen = json.loads((run / "last" / "config.json").read_text())["training"].get("chosen", {})
        return {"nats_per_char": round(held_out_nats_per_char(run, text), 4), "steps": result["steps"],
                "seconds": result["seconds"], "chosen": chosen.get("line", "")}


def run_reference(corpus: Path, seconds: float) -> dict:
    script = SHARED / "bench" / "ref_charlstm.py"
    lines = json_lines([sys.executable, str(script), str(corpus), "--seconds", str(seconds)])
    return {"nats_per_char": round(lines[-1]["val_loss"], 4), "steps": lines[-1]["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="60,300", help="seconds, comma-separated")
    p.add_argument("--corpora", default=",".join(CORPORA))
    p.add_argument("--no-ref", action="store_true", help="skip the reference")
    p.add_argument("--flags", default="", help="more options for rnngen train (what a flag would change)")
    a = p.parse_args()
    cells = []
    for name, text, work in each_available(a.corpora, corpus_text):
        corpus = work / f"{name}.txt"
        corpus.write_text(text, encoding="utf-8")
        for seconds in (float(b) for b in a.budgets.split(",")):
            cell = {"corpus": name, "chars": len(text), "seconds": seconds, "flags": a.flags,
                    "rnngen": run_rnngen(corpus, text, seconds, shlex.split(a.flags))}
            if not a.no_ref:
                cell["reference"] = run_reference(corpus, seconds)
                cell["lower_by"] = round(cell["reference"]["nats_per_char"] - cell["rnngen"]["nats_per_char"], 4)
            cells.append(cell)
            print(json.dumps(cell, ensure_ascii=False), flush=True)
    gaps = [c["lower_by"] for c in cells if "lower_by" in c and math.isfinite(c["lower_by"])]
    record = {"cells": cells, "mean_lower_by": round(sum(gaps) / len(gaps), 4) if gaps else None,
              "target": "every cell at least 0.05 lower, 0.08 lower on average"}
    print(f"saved {save('defaults', record)}")


if __name__ == "__main__":
    main()
