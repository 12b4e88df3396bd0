"""AG News topic classification (../shared/data/ag_news/test.csv: 7,600 rows, 4 classes), on the CPU.

Rows whose index % 5 == 0 are the test set (1,520), the rest train (6,080). Two runs, each through the
installed command: a classifier trained from scratch, and one fine-tuned from a language model first
trained on the same training texts (title + description, one per line). Both are evaluated on the test
rows with `rnngen classify eval`; the wall time of each includes its language-model pre-training.

    python benchmarks/classify_agnews.py [--lm-time 600] [--cls-time 600] [-- extra `classify train` options]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import rnngen, save, shared_path

from rnngen.labelled import read_labelled


def write_split(root: Path) -> tuple[Path, Path, Path]:
    data = read_labelled([shared_path("data", "ag_news", "test.csv")], header=False, text_columns=[2, 3],
                         label_column=1)
    rows = {"train": [], "test": []}
    for i, (text, label) in enumerate(zip(data.texts, data.labels)):
        rows["test" if i % 5 == 0 else "train"].append({"text": text, "label": label})
    paths = []
    for name, part in rows.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(path)
    corpus = root / "train_texts.txt"
    corpus.write_text("".join(r["text"] + "\n" for r in rows["train"]), encoding="utf-8")
    return paths[0], paths[1], corpus


def classify_run(train: Path, test: Path, out: Path, extra: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    rnngen("classify", "train", str(train), "--out", str(out), "--val-fraction", "0.1", *extra, "--quiet")
    seconds = time.perf_counter() - started
    result = json.loads(rnngen("classify", "eval", str(out), str(test), "--json"))
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-time", type=float, default=600, help="seconds of language-model pre-training")
    parser.add_argument("--cls-time", type=float, default=600, help="seconds of classifier training, at most")
    parser.add_argument("--model", default="", help="model and tokenizer options for the scratch classifier and "
                                                    "the language model, one string (e.g. '--hidden 512')")
    parser.add_argument("--lm-options", default="", help="extra `rnngen train` options, one string")
    parser.add_argument("--skip-scratch", action="store_true")
    parser.add_argument("--skip-lm", action="store_true", help="only the classifier trained from scratch")
    parser.add_argument("extra", nargs="*", help="options for `rnngen classify train` (after --)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rnngen-agnews-"))
    train, test, corpus = write_split(root)
    cls = ["--max-time", str(args.cls_time), *args.extra]
    model = args.model.split()
    report: dict = {"benchmark": "classify_agnews", "model": model, "options": cls, "lm_options": args.lm_options}
    if not args.skip_scratch:
        report["scratch"] = classify_run(train, test, root / "scratch", [*model, *cls])
        print(json.dumps(report["scratch"]), flush=True)
    if args.skip_lm:
        print(f"saved {save('classify_agnews', report)}")
        return
    started = time.perf_counter()
    rnngen("train", str(corpus), "--out", str(root / "lm"), "--max-time", str(args.lm_time), "--val-fraction",
           "0.05", "--preset", "plain", *model, *args.lm_options.split(), "--quiet")
    lm_seconds = time.perf_counter() - started
    lm_val = json.loads(rnngen("info", str(root / "lm"), "--json"))["best"]
    tuned = classify_run(train, test, root / "tuned", ["--from", str(root / "lm"), *cls])
    tuned["seconds_with_lm"] = round(tuned["seconds"] + lm_seconds, 1)
    tuned["lm_val_nats_per_char"] = round(lm_val["nats_per_char"], 4)
    report["from_lm"] = tuned
    path = save("classify_agnews", report)
    print(json.dumps(report, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
