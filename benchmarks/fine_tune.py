"""Fine-tuning (`rnngen train --from`) against training from scratch, on a small corpus of a user's own.

The base is the quick-start model: `rnngen train` on the built-in corpus (English prose of Python's help
pages). The small corpus is the first --chars characters of tiny Shakespeare (verse, archaic words,
speaker names: another kind of English), of which rnngen holds out the last 10%. Both runs then train
the same network for the same steps on it, keeping their best validation loss (nats/char).

    python benchmarks/fine_tune.py                      # base 1000 steps, then 600 steps each
    python benchmarks/fine_tune.py --base checkpoints/builtin   # reuse a quick-start model
    python benchmarks/fine_tune.py --quick               # a fast check that it works
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rnngen, save, shared_path  # noqa: E402


def train(*args: str) -> tuple[dict, float]:
    """`rnngen train ... --json`: its result, and the wall time it took."""
    start = time.perf_counter()
    # --preset plain: the recorded result was measured with the fixed defaults, from scratch and fine-tuned alike.
    result = json.loads(rnngen("train", *args, "--preset", "plain", "--json").splitlines()[-1])
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a trained model to start from [default: train the quick-start model]")
    p.add_argument("--base-steps", type=int, default=1000, help="steps of the base when it is trained here")
    p.add_argument("--chars", type=int, default=110_000, help="size of the small corpus")
    p.add_argument("--steps", type=int, default=600, help="steps of each run on the small corpus")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it works, measures nothing")
    args, extra = p.parse_known_args()
    if args.quick:
        args.base_steps, args.chars, args.steps, args.eval_every = 20, 20_000, 20, 10
    text = shared_path("data", "tinyshakespeare.txt").read_text(encoding="utf-8")[: args.chars]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "small.txt"
        corpus.write_text(text, encoding="utf-8")
        base, base_seconds = args.base, None
        if not base:
            base = str(Path(tmp) / "base")
            _, base_seconds = train("--out", base, "--max-steps", str(args.base_steps), "--quiet")
        common = ["--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--quiet", *extra]
        tuned, tuned_seconds = train(str(corpus), "--from", base, "--out", str(Path(tmp) / "tuned"), *common)
        base_config = json.loads((Path(tmp) / "tuned" / "best" / "config.json").read_text())["model"]
        shape = [f"--{k.replace('_', '-')}={base_config[k]}" for k in ("arch", "layers", "hidden", "emb_dim")]
        scratch, scratch_seconds = train(str(corpus), "--out", str(Path(tmp) / "scratch"), *shape, *common)
    nats = {name: run["best"]["nats_per_char"] for name, run in (("fine_tuned", tuned), ("scratch", scratch))}
    record = {"benchmark": "fine_tune", "base": args.base or f"rnngen train --max-steps {args.base_steps}",
              "base_seconds": base_seconds and round(base_seconds, 1), "small_corpus_chars": args.chars,
              "steps": args.steps, "options": extra, "best_val_nats_per_char": nats,
              "seconds": {"fine_tuned": round(tuned_seconds, 1), "scratch": round(scratch_seconds, 1)},
              "difference": round(nats["scratch"] - nats["fine_tuned"], 4)}
    print(json.dumps(record), flush=True)
    if not args.quick:
        print(f"saved {save('fine_tune', record)}")


if __name__ == "__main__":
    main()
