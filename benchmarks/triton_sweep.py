"""CUDA only: batch-1 sampling speed of the Triton step's tilings, beside the reference, in one run.

Each tiling (hidden units per program, inputs per inner-loop pass, logits per program, warps) is built
from the same model and sampled through the real LoadedModel and its CUDA graph, as the fast path does
(temperature 0.8, 3x512 LSTM with random weights, vocabulary 65). The first Triton row is the default
tiling, the second the first one tried (4 units, 256-wide passes, 32 logits per program, 4 warps).

    python benchmarks/triton_sweep.py
"""

from __future__ import annotations

import itertools
import string
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import json_lines, save, shared_path  # noqa: E402
from sample_speed import chars_per_s  # noqa: E402

from rnngen.checkpoint import save_checkpoint  # noqa: E402
from rnngen.config import ModelConfig  # noqa: E402
from rnngen.loaded import LoadedModel  # noqa: E402
from rnngen.model import RNNModel  # noqa: E402
from rnngen.tokenizers import CharTokenizer  # noqa: E402
from rnngen.triton_step import BLOCK_K, BLOCK_V, NUM_WARPS, UNITS, TritonLSTM  # noqa: E402


def main() -> None:
    layers, hidden, emb = 3, 512, 64
    tok = CharTokenizer.fit([string.printable[:64]])
    ref = next(r for r in json_lines([sys.executable, str(shared_path("bench", "ref_sample.py")), "--device", "cuda",
                                      "--n", "2000", "--layers", str(layers), "--hidden", str(hidden), "--emb",
                                      str(emb), "--vocab", str(tok.vocab_size)]) if r["mode"] == "carry")
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=hidden, layers=layers, emb_dim=emb))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ck", model, tok, {})
        gen = LoadedModel.load(str(Path(tmp) / "ck"), device="cuda")
    gen.use_triton = False
    chars_per_s(gen, 200, 1)
    rows = [("cuDNN step in a CUDA graph", chars_per_s(gen, 5000, 3), None)]
    gen.use_triton = True
    stepper = gen.stepper()
    tilings = [(UNITS, BLOCK_K, BLOCK_V, NUM_WARPS), (4, 256, 32, 4)]
    tilings += [t for t in itertools.product((1, 2, 4), (256, None), (8,), (4, 8)) if t not in tilings]
    for units, block_k, block_v, warps in tilings:
        name = f"units {units}, block_k {block_k or 'row'}, block_v {block_v}, warps {warps}"
        try:
            gen._triton_step, gen._graphs = TritonLSTM(stepper, units, block_k, block_v, warps).step, {}
            chars_per_s(gen, 200, 1)
            assert gen.triton_error is None, gen.triton_error
            rows.append((name, chars_per_s(gen, 5000, 3), None))
        except Exception as exc:  # a tiling that does not compile or fit is reported, not fatal
            rows.append((name, 0.0, repr(exc)[:120]))
            gen.triton_error = gen.graph_error = None
    table = Table(title=f"Triton tilings, lstm {layers}x{hidden}, batch 1, {torch.cuda.get_device_name(0)}")
    for column in ("", "chars/s", "vs reference"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("reference (nn.LSTM per char, carried state)", f"{ref['chars_per_s']:,.0f}", "1.0x")
    for name, cps, error in rows:
        table.add_row(name, f"{cps:,.0f}" if not error else error, f"{cps / ref['chars_per_s']:.1f}x")
    Console(width=140).print(table)
    record = {"benchmark": "triton_sweep", "reference_chars_per_s": ref["chars_per_s"],
              "rows": [{"tiling": n, "chars_per_s": round(c), "error": e} for n, c, e in rows]}
    print(f"written: {save('triton_sweep', record)}")


if __name__ == "__main__":
    main()
