"""A corpus larger than RAM would like: peak memory of `rnngen train` and tokenising speed on ~2 GB.

    python benchmarks/large_corpus.py                    # 2 GB in a temporary folder
    python benchmarks/large_corpus.py --size-gb 0.5 --dir /scratch

Writes a corpus of random words (a small vocabulary with some non-ASCII words, punctuation and
newlines) into a temporary folder (or under --dir), then:

1. runs the installed `rnngen train` on it in a subprocess with a fresh token cache: the char
   tokenizer is fitted, the corpus hashed and tokenised, a small model trains a few dozen steps and
   the final evaluation reads the whole validation split (10%). Its peak resident memory is the
   kernel's high-water mark (wait4); its peak anonymous memory (RSS less the pages of mapped files,
   the shared libraries and the token file, which the kernel can drop at will) is polled from /proc.
2. in a fresh Python process, times each stage of the char tokenizer on the corpus: fitting the
   vocabulary, hashing, and tokenising into a new cache (``tokenize_to_file``), with that process's
   peak memory.

Targets: the training run under 1.5 GB, tokenising at least 50 MB/s. Prints a table, writes
benchmarks/out/large_corpus.json, and deletes everything it wrote to disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will what can more out who "
         "said do into about some them may up could like than other then only time its new these also river "
         "window garden light café naïve über façade Ἀθῆναι 東京 señor").split()
SEPARATORS = [" "] * 6 + [", ", ". ", "; ", "! ", "? ", "\n"]  # about one line break in twelve words
TARGET_PEAK_MB, TARGET_MB_PER_S = 1500, 50
MB = 1e6


def write_corpus(path: Path, size: int, seed: int = 0, blocks: int = 32, block_bytes: int = 8 << 20) -> None:
    """About ``size`` bytes of random words: ``blocks`` distinct random blocks, written in random order."""
    rng = np.random.default_rng(seed)
    pieces = np.array([w + s for w in WORDS for s in SEPARATORS], dtype=object)
    made = ["".join(pieces[rng.integers(0, len(pieces), block_bytes // 6)]).encode() for _ in range(blocks)]
    written = 0
    with open(path, "wb") as f:
        while written < size:
            block = made[rng.integers(blocks)]
            f.write(block)
            written += len(block)


def train_peak_memory(corpus: Path, run: Path, cache: Path, steps: int, val_fraction: float) -> dict[str, Any]:
    """Run `rnngen train` on ``corpus``; its time and peak memory (MB)."""
    rnngen = Path(sys.executable).with_name("rnngen")
    command = [str(rnngen), "train", str(corpus), "--out", str(run), "--hidden", "64", "--emb-dim", "16",
               "--layers", "1", "--batch-size", "32", "--seq-len", "64", "--max-steps", str(steps),
               "--eval-every", str(steps), "--val-fraction", str(val_fraction), "--quiet", "--json"]
    log = run.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as out:
        # One thread: this run measures memory, and an LSTM step waits for all its threads, so two
        # threads on a CPU shared with other work crawl (seconds per evaluation window).
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RNNGEN_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
        peak_anon = peak_file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            fields = _proc_status(proc.pid)
            peak_anon = max(peak_anon, fields.get("RssAnon", 0))
            peak_file = max(peak_file, fields.get("RssFile", 0))
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"rnngen train failed ({proc.returncode}): {log.read_text()[-2000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss * 1024 / MB,
            "peak_anon_mb": peak_anon * 1024 / MB, "peak_file_mb": peak_file * 1024 / MB,
            "result": log.read_text().strip().splitlines()[-1]}


def _proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def tokenising_stages(corpus: str, cache: str) -> dict[str, Any]:
    """In a fresh process: the char tokenizer's stages on ``corpus``, timed, and this process's peak memory."""
    from rnngen.corpora import Corpus
    from rnngen.data import tokenize_to_file
    from rnngen.tokenizers import fit_tokenizer

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # noqa: E731
    source = Corpus((Path(corpus),))
    before = peak()
    t0 = time.perf_counter()
    tokenizer = fit_tokenizer(source.chunks(), "char")
    t1 = time.perf_counter()
    fingerprint = source.fingerprint()
    t2 = time.perf_counter()
    tokens = tokenize_to_file(source, tokenizer, Path(cache), fingerprint=fingerprint)
    t3 = time.perf_counter()
    return {"fit_s": t1 - t0, "hash_s": t2 - t1, "tokenise_s": t3 - t2, "tokens": len(tokens),
            "vocab_size": tokenizer.vocab_size, "rss_after_imports_mb": before, "peak_rss_mb": peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="corpus size [default: 2]")
    parser.add_argument("--dir", help="where to write the corpus and caches (a temporary folder inside it)")
    parser.add_argument("--steps", type=int, default=30, help="training steps [default: 30]")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="validation share, all of it read by the final evaluation [default: 0.1]")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="rnngen-large-", dir=args.dir) as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        started = time.perf_counter()
        write_corpus(corpus, int(args.size_gb * 1e9))
        size = corpus.stat().st_size
        console.print(f"wrote {size / MB:,.0f} MB in {time.perf_counter() - started:.1f} s; training ...")
        train = train_peak_memory(corpus, root / "run", root / "cache-train", args.steps, args.val_fraction)
        shutil.rmtree(root / "cache-train")  # the token file: twice the corpus, in uint16
        console.print("timing the tokenising stages in a fresh process ...")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            stages = pool.apply(tokenising_stages, (str(corpus), str(root / "cache-tok")))
    rate = lambda seconds: size / MB / seconds  # noqa: E731
    record = {"corpus_bytes": size, "val_fraction": args.val_fraction, "train": train, "stages": stages,
              "tokenise_mb_per_s": rate(stages["tokenise_s"]), "fit_mb_per_s": rate(stages["fit_s"]),
              "hash_mb_per_s": rate(stages["hash_s"])}
    table = Table(title=f"a {size / 1e9:.2f} GB corpus, char tokenizer", title_justify="left")
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    ok = lambda good: "[green]met[/]" if good else "[red]not met[/]"  # noqa: E731
    table.add_row("rnngen train: peak resident memory", f"{train['peak_rss_mb']:,.0f} MB",
                  f"< {TARGET_PEAK_MB:,} MB {ok(train['peak_rss_mb'] < TARGET_PEAK_MB)}")
    table.add_row("  of which anonymous (polled)", f"{train['peak_anon_mb']:,.0f} MB", "")
    table.add_row("  of which file pages: libraries, token file (polled)", f"{train['peak_file_mb']:,.0f} MB", "")
    table.add_row("rnngen train: wall time (tokenise, train, evaluate)", f"{train['seconds']:.0f} s", "")
    table.add_row("tokenise into the cache (tokenize_to_file)",
                  f"{record['tokenise_mb_per_s']:.0f} MB/s ({stages['tokenise_s']:.1f} s)",
                  f">= {TARGET_MB_PER_S} MB/s {ok(record['tokenise_mb_per_s'] >= TARGET_MB_PER_S)}")
    table.add_row("fit the char vocabulary", f"{record['fit_mb_per_s']:.0f} MB/s ({stages['fit_s']:.1f} s)", "")
    table.add_row("hash the corpus (cache key)", f"{record['hash_mb_per_s']:.0f} MB/s ({stages['hash_s']:.1f} s)", "")
    table.add_row("tokenising process: peak memory (after imports)",
                  f"{stages['peak_rss_mb']:,.0f} MB ({stages['rss_after_imports_mb']:,.0f} MB)", "")
    console.print(table)
    console.print(f"wrote {save('large_corpus', record)}")


if __name__ == "__main__":
    main()
