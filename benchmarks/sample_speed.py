"""Sampling speed: rnngen's generation path against the reference, side by side in one run.

The reference (../shared/bench/ref_sample.py, "carry") calls nn.LSTM once per character with the state
carried; it runs in its own process with the same sizes, once before rnngen and --ref-runs - 1 times after
(the machine's speed drifts), and its best run counts. rnngen runs in this process, on a model of the same
shape (random weights: speed does not depend on them) saved and loaded as a checkpoint and sampled
through the real LoadedModel (temperature 0.8, no stop string):

  - batch 1: chars/s of the fast path (the default), and of the plain path (one model call per token);
  - flatness: seconds per char for --long chars over seconds per char for --short chars (1.0 = flat);
  - batched: --batch samples of --batch-chars chars at once (sample_many), total chars/s.

    python benchmarks/sample_speed.py                                   # CPU, 2x256 (the recorded run)
    python benchmarks/sample_speed.py --device cuda --layers 3 --hidden 512

On the CPU the fast path at batch 1 is the compiled C step (rnngen.cpu_step); the torch step, the fast
path before it, is measured beside it. On CUDA it is the Triton step in a CUDA graph; the model's own step
(cuDNN) in a CUDA graph is measured beside it.
"""

from __future__ import annotations

import argparse
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import json_lines, save, shared_path  # noqa: E402

from rnngen.checkpoint import save_checkpoint  # noqa: E402
from rnngen.config import ModelConfig  # noqa: E402
from rnngen.loaded import LoadedModel  # noqa: E402
from rnngen.model import RNNModel  # noqa: E402
from rnngen.tokenizers import CharTokenizer  # noqa: E402


def chars_per_s(gen: LoadedModel, chars: int, repeats: int, **options: Any) -> float:
    """The best of ``repeats`` runs of one ``chars``-long sample from an empty prompt, clock started before
    the call (the fast paths produce text in blocks: timing from the first piece would leave a block out).
    Call once first as a warm-up: the first run prepares the weights (and captures the CUDA graph)."""
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        text = "".join(gen.generate("", length=chars, temperature=0.8, seed=i, **options))
        best = min(best, (time.perf_counter() - t0) / len(text))
    return 1 / best


def batch_chars_per_s(gen: LoadedModel, n: int, chars: int, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        texts = gen.sample_many(n, "", length=chars, temperature=0.8, seed=i)
        best = min(best, (time.perf_counter() - t0) / sum(len(t) for t in texts))
    return 1 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="lstm", choices=["lstm", "gru", "rnn"],
                        help="rnngen's cell (the reference is always an nn.LSTM of the same size)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--emb", type=int, default=64)
    parser.add_argument("--chars", type=int, default=5000, help="Characters per batch-1 run.")
    parser.add_argument("--short", type=int, default=1000)
    parser.add_argument("--long", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-chars", type=int, default=500)
    parser.add_argument("--ref-chars", type=int, default=2000, help="Characters the reference generates.")
    parser.add_argument("--plain-chars", type=int, default=1000, help="Characters for the plain path.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-runs", type=int, default=3,
                        help="Runs of the reference (one before rnngen, the rest after); its best counts.")
    args = parser.parse_args()

    tok = CharTokenizer.fit([string.printable[:64]])  # 64 characters and <unk>: the reference's 65
    sizes = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--emb", str(args.emb),
             "--vocab", str(tok.vocab_size)]
    def reference() -> list[dict[str, Any]]:
        return json_lines([sys.executable, str(shared_path("bench", "ref_sample.py")), "--device", args.device,
                           "--n", str(args.ref_chars), *sizes])

    ref_rows = reference()  # the machine's speed drifts (the reference read 512 to 1,521 chars/s in one
    # hour on the 2-core machine): it runs again after rnngen, and its best run counts

    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=args.hidden, layers=args.layers,
                                 emb_dim=args.emb, arch=args.arch))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ck", model, tok, {})
        gen = LoadedModel.load(str(Path(tmp) / "ck"), device=args.device)
    plain = LoadedModel(gen.model, gen.tokenizer, gen.config, gen.directory, fast=False)
    chars_per_s(gen, 200, 1)  # warm-up: weights prepared, allocator and thread pool started
    fast = chars_per_s(gen, args.chars, args.repeats)
    filtered = chars_per_s(gen, args.chars, args.repeats, top_k=40, top_p=0.95)  # the filters' own cost
    cudnn = None  # on CUDA, batch 1 steps through Triton kernels; also measured: the model's own (cuDNN) step
    if args.device == "cuda":
        graph = LoadedModel(gen.model, gen.tokenizer, gen.config, gen.directory)
        graph.use_triton = False
        chars_per_s(graph, 200, 1)
        cudnn = chars_per_s(graph, args.chars, args.repeats)
    torch_step = None  # on the CPU, batch 1 runs compiled C (rnngen.cpu_step); also measured: the torch step
    if args.device == "cpu":
        eager = LoadedModel(gen.model, gen.tokenizer, gen.config, gen.directory)
        eager.use_native = False
        chars_per_s(eager, 200, 1)
        torch_step = chars_per_s(eager, args.chars, args.repeats)
    slow = chars_per_s(plain, args.plain_chars, args.repeats)
    # short and long runs alternate, so that a drift in the machine's speed touches both alike
    short, long = map(max, zip(*((chars_per_s(gen, args.short, 1), chars_per_s(gen, args.long, 1))
                                 for _ in range(args.repeats))))
    batched = batch_chars_per_s(gen, args.batch, args.batch_chars, args.repeats)
    for _ in range(args.ref_runs - 1):
        ref_rows += reference()
    ref_runs = [r["chars_per_s"] for r in ref_rows if r["mode"] == "carry"]
    ref = max((r for r in ref_rows if r["mode"] == "carry"), key=lambda r: r["chars_per_s"])
    record = {
        "benchmark": "sample_speed", "device": args.device,
        "model": f"random {args.arch} {args.layers}x{args.hidden}, emb {args.emb}, vocab {tok.vocab_size}",
        "threads": torch.get_num_threads(), "graph_error": repr(gen.graph_error) if gen.graph_error else None,
        "native_error": repr(gen.native_error) if gen.native_error else None,
        "triton_error": repr(gen.triton_error) if gen.triton_error else None,
        "fast_cudnn_graph_chars_per_s": round(cudnn) if cudnn else None,
        "reference_chars_per_s": ref["chars_per_s"], "reference_runs_chars_per_s": ref_runs,
        "fast_torch_step_chars_per_s": round(torch_step) if torch_step else None, "reference_refeed_chars_per_s":
            next((r["chars_per_s"] for r in ref_rows if r["mode"] == "refeed"), None),
        "fast_chars_per_s": round(fast), "fast_over_reference": round(fast / ref["chars_per_s"], 2),
        "fast_top_k_40_top_p_0.95_chars_per_s": round(filtered),
        "plain_chars_per_s": round(slow), "fast_over_plain": round(fast / slow, 2),
        f"chars_per_s_{args.short}": round(short), f"chars_per_s_{args.long}": round(long),
        "per_char_cost_long_over_short": round(short / long, 3),
        "batch": args.batch, "batch_chars_per_s": round(batched),
        "batch_over_reference": round(batched / ref["chars_per_s"], 2),
    }
    table = Table(title=f"sampling speed, {record['model']}, {args.device}")
    for column in ("", "chars/s", "vs reference"):
        table.add_column(column, justify="right" if column else "left")
    ref_cps = ref["chars_per_s"]
    for name, value in [("reference (nn.LSTM per char, carried state)", ref_cps),
                        ("rnngen plain path (model call per token)", slow),
                        *([("rnngen, model's own step in a CUDA graph, batch 1", cudnn)] if cudnn else []),
                        *([("rnngen, torch step (compiled step off), batch 1", torch_step)] if torch_step else []),
                        ("rnngen fast path, batch 1", fast),
                        ("rnngen fast path, batch 1, --top-k 40 --top-p 0.95", filtered),
                        (f"rnngen, {args.batch} samples at once (total)", batched)]:
        table.add_row(name, f"{value:,.0f}", f"{value / ref_cps:.1f}x")
    table.add_row(f"per-char cost, {args.long:,} vs {args.short:,} chars", f"{short / long:.3f}", "")
    Console().print(table)
    name = f"sample_speed_{args.device}_{'' if args.arch == 'lstm' else args.arch + '_'}{args.layers}x{args.hidden}"
    print(f"written: {save(name, record)}")


if __name__ == "__main__":
    main()
