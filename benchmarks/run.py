"""Run the speed and scale benchmarks on this machine, one after another, and print rnngen vs reference.

Each benchmark is its own script (run alone for its options); this runs them in sequence (never two
at once: torch processes sharing a few cores slow each other down), reads the JSON each writes to
benchmarks/out/, prints one rich table with the ratios and writes benchmarks/out/bench_summary.json.

    python benchmarks/run.py              # the recorded sizes (about 25 minutes on 2 CPU cores)
    python benchmarks/run.py --quick      # shorter runs and a 0.2 GB corpus, to check it all works
    python benchmarks/run.py --only sample,throughput
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import OUT, save

HERE = Path(__file__).resolve().parent


@dataclass
class Bench:
    name: str
    script: list[str]  # arguments after `python benchmarks/`
    quick: list[str]  # replacing options for --quick
    output: str  # the JSON file it writes under benchmarks/out/
    rows: Callable[[dict[str, Any]], list[tuple[str, str, str, str, bool | None]]]


def _sample_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    return [(f"sampling, batch 1 ({r['model']}, {r['device']})", f"{r['fast_chars_per_s']:,} chars/s",
             f"{r['reference_chars_per_s']:,} chars/s", f"{r['fast_over_reference']:.1f}x (>= 20x)",
             r["fast_over_reference"] >= 20),
            ("sampling, cost per char 20k vs 1k chars", f"{r['per_char_cost_long_over_short']:.2f}", "", "flat", None),
            (f"sampling, {r['batch']} streams at once", f"{r['batch_chars_per_s']:,} chars/s",
             f"{r['reference_chars_per_s']:,} chars/s", f"{r['batch_over_reference']:.0f}x", None)]


def _throughput_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    ours = statistics.median(pair["rnngen_chars_per_s"] for pair in r["pairs"])
    ref = statistics.median(pair["reference_chars_per_s"] for pair in r["pairs"])
    return [(f"training chars/s at the reference's config (2x256, fp32), median of {len(r['pairs'])}",
             f"{ours:,.0f}", f"{ref:,.0f}", f"{r['ratio']:.2f}x (>= 1.0x)", r["ratio"] >= 1.0)]


def _quality_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    ours, ref = r["rnngen"]["val_loss"], r.get("reference", {}).get("best_val_loss")
    return [(f"tiny Shakespeare val loss, rnngen {r['seconds']:.0f} s vs reference {r['ref_seconds']:.0f} s",
             f"{ours:.4f}", "-" if ref is None else f"{ref:.4f}",
             f"time {r['seconds'] / r['ref_seconds']:.2f}x (<= 0.5x, as good)",
             None if ref is None else ours <= ref and r["seconds"] <= r["ref_seconds"] / 2)]


def _large_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    gb = r["corpus_bytes"] / 1e9
    return [(f"peak memory training on a {gb:.1f} GB corpus", f"{r['train']['peak_rss_mb']:.0f} MB", "",
             "< 1.5 GB", r["train"]["peak_rss_mb"] < 1500),
            ("char tokenising into the memory-mapped cache", f"{r['tokenise_mb_per_s']:.0f} MB/s", "",
             ">= 50 MB/s", r["tokenise_mb_per_s"] >= 50)]


def _chat_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    n = r["turns"]
    return [(f"chat: turn {n} / turn 1", f"{r[f'turn_{n}_ms']:.1f} / {r['turn_1_ms']:.1f} ms",
             f"re-read: {r[f'naive_turn_{n}_ms']:.1f} ms", f"{r['ratio_last_vs_first']:.2f} (<= 1.2)",
             r["ratio_last_vs_first"] <= 1.2)]


BENCHES = [
    Bench("sample", ["sample_speed.py"], ["--chars", "2000", "--long", "5000", "--ref-chars", "500"],
          "sample_speed_cpu_2x256.json", _sample_rows),
    Bench("throughput", ["train_shakespeare.py", "--throughput", "--seconds", "90"], ["--seconds", "20", "--repeats", "1"],
          "train_throughput.json", _throughput_rows),
    Bench("quality", ["train_shakespeare.py", "--seconds", "300", "--ref-seconds", "600", "--", "--hidden", "384",
                      "--emb-dim", "64", "--batch-size", "32", "--dropout", "0", "--emb-dropout", "0", "--lr", "2e-3",
                      "--warmup-steps", "50", "--eval-every", "800", "--state-reset", "0.3", "--weight-decay", "0.4"],
          ["--seconds", "30", "--ref-seconds", "60"], "train_shakespeare.json", _quality_rows),
    Bench("large", ["large_corpus.py", "--size-gb", "2"], ["--size-gb", "0.2"], "large_corpus.json", _large_rows),
    Bench("chat", ["chat_turns.py"], ["--repeats", "2", "--turns", "10"], "chat_turns.json", _chat_rows),
]


def command(bench: Bench, quick: bool) -> list[str]:
    args = list(bench.script)
    if quick:  # options given again later win (argparse); put them before a "--"
        cut = args.index("--") if "--" in args else len(args)
        args = args[:cut] + bench.quick + args[cut:]
    return [sys.executable, str(HERE / args[0]), *args[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, to check that everything works")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(b.name for b in BENCHES)}")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: dict[str, Any] = {}
    for bench in chosen:
        console.print(f"[bold]running[/] {' '.join(command(bench, args.quick)[1:])}")
        proc = subprocess.run(command(bench, args.quick), capture_output=True, text=True)
        if proc.returncode != 0:
            console.print(f"[red]{bench.name} failed or was skipped:[/] {proc.stderr.strip()[-500:]}")
            continue
        results[bench.name] = json.loads((OUT / bench.output).read_text())
    table = Table(title="rnngen vs reference, this machine" + (" (--quick: not the recorded sizes)" if args.quick else ""))
    for col in ("measure", "rnngen", "reference", "ratio / target", "met"):
        table.add_column(col)
    for bench in chosen:
        for measure, ours, ref, ratio, met in bench.rows(results[bench.name]) if bench.name in results else []:
            table.add_row(measure, ours, ref, ratio, "-" if met is None else ("[green]yes[/]" if met else "[red]no[/]"))
    console.print(table)
    console.print(f"wrote {save('bench_summary', {'quick': args.quick, 'results': results})}")


if __name__ == "__main__":
    main()
