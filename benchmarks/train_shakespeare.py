"""Time to quality on tiny Shakespeare: rnngen vs ../shared/bench/ref_charlstm.py, same wall clock, one run.

Both train for --seconds on the first 90% and are scored on the last 10% (nats/char) by the reference's
own protocol (windows of 512 characters, fresh state each), so the numbers compare directly.

    python benchmarks/train_shakespeare.py --seconds 600 -- OPTIONS   # the recorded benchmark (options: RESULTS.md)
    python benchmarks/train_shakespeare.py --seconds 300 --ref-seconds 600  # half the time: as good?
    python benchmarks/train_shakespeare.py --seconds 60 --no-ref  # a quick look at rnngen alone
    python benchmarks/train_shakespeare.py --throughput --seconds 90 --repeats 3  # chars/s at the ref's config
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import json_lines, save, shared_path  # noqa: E402


def ref_protocol_val_loss(run_dir: Path, text: str) -> float:
    """The reference's evaluation: last 10% in windows of 512, fresh state per window."""
    import rnngen

    gen = rnngen.load(str(run_dir))
    data = torch.from_numpy(gen.tokenizer.encode(text).astype("int64"))
    val = data[int(0.9 * len(data)):]
    total, count, L = 0.0, 0, 512
    with torch.no_grad():
        for i in range(0, len(val) - L - 1, L):
            x, y = val[i:i + L].unsqueeze(0), val[i + 1:i + L + 1].unsqueeze(0)
            logits, _ = gen.model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item() * L
            count += L
    return total / count


REF_CONFIG = ["--layers", "2", "--hidden", "256", "--emb-dim", "64", "--batch-size", "64", "--seq-len", "128",
              "--dropout", "0", "--emb-dropout", "0", "--precision", "fp32", "--lr", "2e-3", "--state-reset", "0",
              "--preset", "plain"]
# The recorded configurations were measured with the fixed defaults (cosine schedule, ...): they run with
# --preset plain unless the options say otherwise (benchmarks/defaults.py measures the chosen ones).
PLAIN = ["--preset", "plain"]


def throughput(corpus: Path, ref_script: Path, seconds: float, repeats: int) -> None:
    """Training chars/s of both at the reference's exact configuration, no evaluation inside the window.

    The two alternate ``repeats`` times (a single pair varies by several per cent on a shared machine);
    the ratio reported is the median of the pairs'.
    """
    pairs = []
    for _ in range(repeats):
        ref = json_lines([sys.executable, str(ref_script), str(corpus), "--seconds", str(seconds)])[-1]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(Path(tmp) / "run"),
                   "--max-time", str(seconds), "--eval-every", "1000000",
                   "--eval-max-tokens", "4096", "--json", *REF_CONFIG]
            result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        ours = result["steps"] * 64 * 128 / result["seconds"]
        pairs.append({"reference_chars_per_s": ref["chars_per_s"], "rnngen_chars_per_s": round(ours),
                      "ratio": round(ours / ref["chars_per_s"], 3)})
        print(json.dumps(pairs[-1]), flush=True)
    record = {"benchmark": "train_throughput", "seconds": seconds, "config": REF_CONFIG, "pairs": pairs,
              "ratio": round(statistics.median(pair["ratio"] for pair in pairs), 3)}
    print(json.dumps(record), flush=True)
    print(f"saved {save('train_throughput', record)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--ref-seconds", type=float, help="the reference's training time [default: --seconds]")
    p.add_argument("--no-ref", action="store_true", help="skip the reference")
    p.add_argument("--throughput", action="store_true",
                   help="training chars/s at the reference's exact configuration (2x256, batch 64 x 128, fp32, "
                        "no dropout), no evaluation, both for --seconds")
    p.add_argument("--repeats", type=int, default=3, help="with --throughput: alternating pairs of runs")
    p.add_argument("rnngen_args", nargs="*", help="extra options for rnngen train (after --)")
    a = p.parse_args()
    corpus = shared_path("data", "tinyshakespeare.txt")
    ref_script = shared_path("bench", "ref_charlstm.py")
    if a.throughput:
        return throughput(corpus, ref_script, a.seconds, a.repeats)
    ref_seconds = a.ref_seconds or a.seconds
    record: dict = {"seconds": a.seconds, "ref_seconds": ref_seconds, "rnngen_args": a.rnngen_args}
    if not a.no_ref:
        lines = json_lines([sys.executable, str(ref_script), str(corpus), "--seconds", str(ref_seconds),
                            "--eval-every", "150"])
        record["reference"] = {"val_loss": lines[-1]["val_loss"],
                               "best_val_loss": min(r.get("val", r.get("val_loss", 99)) for r in lines),
                               "chars_per_s": lines[-1]["chars_per_s"], "steps": lines[-1]["steps"]}
        print(json.dumps({"reference": record["reference"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(run), "--max-time",
               str(a.seconds), "--json", *([] if "--preset" in a.rnngen_args else PLAIN), *a.rnngen_args]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        record["rnngen"] = {"val_loss": round(ref_protocol_val_loss(run, corpus.read_text("utf-8")), 4),
                            "val_loss_carried_state": round(result["best"]["loss"], 4),
                            "train_loss": round(result["train_loss"], 4),
                            "steps": result["steps"], "seconds": result["seconds"],
                            "parameters": result["parameters"]}
    if "reference" in record:
        record["improvement_nats"] = round(record["reference"]["best_val_loss"] - record["rnngen"]["val_loss"], 4)
        record["time_ratio"] = round(a.seconds / ref_seconds, 3)
        record["as_good_in_time_ratio"] = record["improvement_nats"] >= 0
    print(json.dumps(record), flush=True)
    print(f"saved {save('train_shakespeare', record)}")


if __name__ == "__main__":
    main()
