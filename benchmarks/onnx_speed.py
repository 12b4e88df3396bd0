"""Batch-1 sampling speed: the ONNX example sampler on onnxruntime against rnngen's own fast path.

Both sample from the same model, a 2x256 LSTM (embedding 64, 65 symbols, random weights: speed does not
depend on them) saved as a checkpoint, then exported with `rnngen export`:

  - rnngen: ``rnngen.load(ckpt).sample(...)``, the path `rnngen sample` takes (on the CPU, the compiled C
    step in blocks of 32 tokens);
  - onnxruntime: the loop of examples/onnx_sample.py (one InferenceSession.run per token, sampling in
    numpy), with onnxruntime's own choice of threads and with one thread.

Temperature 0.8, no prompt, no stop string; chars/s of the best of --repeats runs, the clock started
before each call. A measurement, not a target: run it alone (two processes on 2 cores slow each other).

    python benchmarks/onnx_speed.py            # the recorded sizes
    python benchmarks/onnx_speed.py --quick    # a few hundred characters: checks that it works
"""

from __future__ import annotations

import argparse
import importlib.util
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import save  # noqa: E402

import rnngen  # noqa: E402
from rnngen.checkpoint import save_checkpoint  # noqa: E402
from rnngen.config import ModelConfig  # noqa: E402
from rnngen.export import export_onnx  # noqa: E402
from rnngen.model import RNNModel  # noqa: E402
from rnngen.tokenizers import CharTokenizer  # noqa: E402


def example_sampler():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("onnx_sample", HERE.parent / "examples" / "onnx_sample.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def chars_per_s(sample: Callable[[int, int], Iterator[str] | str], chars: int, repeats: int) -> float:
    """Best of ``repeats`` runs of ``sample(length, seed)``, after one short warm-up run."""
    "".join(sample(50, 0))
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        text = "".join(sample(chars, i))
        best = min(best, (time.perf_counter() - t0) / len(text))
    return 1 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lstm", choices=["lstm", "gru", "rnn"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--emb", type=int, default=64)
    parser.add_argument("--chars", type=int, default=5000, help="Characters per run.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 characters, one run: checks that it works.")
    args = parser.parse_args()
    if args.quick:
        args.chars, args.repeats = 300, 1

    sampler = example_sampler()
    tok = CharTokenizer.fit([string.printable[:64]])  # 64 characters and <unk>, as sample_speed.py
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=args.hidden, layers=args.layers,
                                 emb_dim=args.emb, arch=args.arch))
    name = f"random {args.arch} {args.layers}x{args.hidden}, emb {args.emb}, vocab {tok.vocab_size}"
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ck", model, tok, {})
        export_onnx(Path(tmp) / "ck", Path(tmp) / "onnx")
        loaded = rnngen.load(str(Path(tmp) / "ck"))
        ours = chars_per_s(lambda n, seed: loaded.sample("", length=n, temperature=0.8, seed=seed),
                           args.chars, args.repeats)
        results = {"rnngen fast path (rnngen.load(...).sample)": ours}
        for threads in (None, 1):
            lm = sampler.OnnxLM(Path(tmp) / "onnx", threads)
            label = f"onnxruntime, examples/onnx_sample.py ({threads or 'default'} thread{'s' if threads != 1 else ''})"
            results[label] = chars_per_s(lambda n, seed, lm=lm: sampler.generate(lm, "", length=n, temperature=0.8,
                                                                                 seed=seed), args.chars, args.repeats)
    import onnxruntime

    record = {"benchmark": "onnx_speed", "model": name, "chars": args.chars, "repeats": args.repeats,
              "quick": args.quick, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
              "chars_per_s": {k: round(v) for k, v in results.items()},
              "over_rnngen": {k: round(v / ours, 3) for k, v in results.items()}}
    path = save("onnx_speed_quick" if args.quick else "onnx_speed", record)
    table = Table(title=f"batch-1 sampling speed, {name}, CPU, temperature 0.8")
    for column in ("", "chars/s", "vs rnngen"):
        table.add_column(column, justify="right" if column else "left")
    for label, value in results.items():
        table.add_row(label, f"{value:,.0f}", f"{value / ours:.2f}x")
    Console().print(table)
    Console(stderr=True).print(f"wrote {path}")


if __name__ == "__main__":
    main()
