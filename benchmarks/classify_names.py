"""Surname classification and label-conditioned surname generation (../shared/data/names, 18 languages).

1. De-duplicate (name, language) pairs and split them 80/20, stratified, with a fixed seed.
2. Train with the installed `rnngen classify train` on the 80% (it holds out its own validation
   share for early stopping), optionally fine-tuning a language model first trained on the same names.
3. `rnngen classify eval` on the 20% test split: accuracy and macro-F1 (majority class: Russian), with
   the language model's vote the checkpoint chose and with the classifier head alone (`--lm-vote 0`).
4. The same checkpoint generates 200 names per language with `--label` (languages with >= 200 training
   names), with each `--guidance` value; its own classifier head labels them; report the share given
   the requested label, and the shares of distinct names and of names not in the training set.

    python benchmarks/classify_names.py [--from-lm] [-- extra `classify train` options]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import rnngen as api
from common import SHARED, rnngen, save

from rnngen.labelled import read_labelled, stratified_split


def write_split(root: Path, seed: int) -> tuple[Path, Path, Counter]:
    data = read_labelled([SHARED / "data" / "names"])
    train, test = stratified_split(data, 0.2, seed)
    paths = []
    for name, part in (("train", train), ("test", test)):
        path = root / f"{name}.tsv"
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in zip(part.texts, part.labels)),
                        encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], Counter(train.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--from-lm", action="store_true", help="first train a language model on the names")
    parser.add_argument("--lm-steps", type=int, default=1500)
    parser.add_argument("--per-label", type=int, default=200)
    parser.add_argument("--temperature", default="0.7", help="sampling temperatures of generated names, comma-separated")
    parser.add_argument("--guidance", default="1,2", help="guidance values to generate with, comma-separated")
    parser.add_argument("--compare-lm-weight", action="store_true",
                        help="with --from-lm: also fine-tune with --lm-weight 0 and compare the language-model loss "
                             "on the names the LM held out")
    parser.add_argument("--lm-options", default="", help="extra `rnngen train` options for --from-lm, one string")
    parser.add_argument("extra", nargs="*", help="options for `rnngen classify train` (after --)")
    args = parser.parse_args()
    if not (SHARED / "data" / "names").is_dir():
        sys.exit(f"skipped: {SHARED / 'data' / 'names'} is absent (set RNNGEN_SHARED)")
    root = Path(tempfile.mkdtemp(prefix="rnngen-names-"))
    train, test, counts = write_split(root, args.seed)
    started = time.perf_counter()
    base: list[str] = []
    if args.from_lm:
        corpus = root / "names.txt"
        corpus.write_text("".join(line.split("\t")[0] + "\n" for line in train.read_text().splitlines()[1:]))
        rnngen("train", str(corpus), "--out", str(root / "lm"), "--max-steps", str(args.lm_steps),
               "--batch-size", "32", "--seq-len", "64", "--eval-every", "500", "--preset", "plain",
               *args.lm_options.split(), "--quiet")
        base = ["--from", str(root / "lm")]
        text = corpus.read_text(encoding="utf-8")
        held_out = root / "lm_val.txt"  # what `rnngen train` held out: the last 10% of the corpus
        held_out.write_text(text[int(len(text) * 0.9):], encoding="utf-8")
    run = root / "cls"
    rnngen("classify", "train", str(train), "--out", str(run), "--val-fraction", "0.1", *base, *args.extra,
           "--quiet")
    train_seconds = time.perf_counter() - started
    lm_loss = {}
    if args.from_lm:
        def held_out_loss(checkpoint: Path) -> float:
            return round(json.loads(rnngen("eval", str(checkpoint), str(held_out), "--json"))["nats_per_char"], 4)

        lm_loss = {"language_model": held_out_loss(root / "lm"), "fine_tuned": held_out_loss(run)}
        if args.compare_lm_weight:
            rnngen("classify", "train", str(train), "--out", str(root / "cls0"), "--val-fraction", "0.1", *base,
                   *args.extra, "--lm-weight", "0", "--quiet")
            lm_loss["fine_tuned_lm_weight_0"] = held_out_loss(root / "cls0")
            lm_loss["fine_tuned_lm_weight_0_test_accuracy"] = round(json.loads(rnngen(
                "classify", "eval", str(root / "cls0"), str(test), "--json"))["accuracy"], 4)
    result = json.loads(rnngen("classify", "eval", str(run), str(test), "--json"))
    head_alone = json.loads(rnngen("classify", "eval", str(run), str(test), "--json", "--lm-vote", "0"))
    # Label-conditioned generation, judged by the same checkpoint's classifier: for each guidance value,
    # the share given the requested label, and how many names are distinct and not in the training set.
    gen = api.load(str(run))
    seen = {line.split("\t")[0] for line in train.read_text(encoding="utf-8").splitlines()[1:]}
    generation: dict[str, Any] = {}
    settings = [(float(t), float(g)) for t in args.temperature.split(",") for g in args.guidance.split(",")]
    if gen.model.config.bidirectional:  # it classifies but cannot generate
        settings, generation = [], {"skipped": "a bidirectional encoder cannot generate"}
    for temperature, guidance in settings:
        agreement, distinct, novel = {}, [], []
        for label in sorted(label for label, n in counts.items() if n >= 200):
            names = [n.strip() for n in gen.sample_many(args.per_label, label=label, length=30, seed=0,
                                                         temperature=temperature, guidance=guidance)]
            names = [n for n in names if n]
            # judged by the classifier head alone: the LM that generated the names would vote for their label
            predicted = [r["label"] for r in gen.classify(names, lm_vote=0)]
            agreement[label] = round(sum(p == label for p in predicted) / max(1, len(predicted)), 3)
            distinct.append(len(set(names)) / max(1, len(names)))
            novel.append(sum(n not in seen for n in names) / max(1, len(names)))
        generation[f"temperature_{temperature:g}_guidance_{guidance:g}"] = {
            "label_agreement": agreement, "label_agreement_mean": round(sum(agreement.values()) / len(agreement), 4),
            "distinct_share": round(sum(distinct) / len(distinct), 3), "novel_share": round(sum(novel) / len(novel), 3)}
    report = {"benchmark": "classify_names", "split_seed": args.seed, "from_lm": args.from_lm,
              "options": args.extra, "lm_options": args.lm_options,
              "temperature": args.temperature, "train_seconds": round(train_seconds, 1),
              "test_accuracy": round(result["accuracy"], 4), "test_macro_f1": round(result["macro_f1"], 4),
              "test_examples": result["examples"], "lm_vote": result["lm_vote"],
              "test_accuracy_head_alone": round(head_alone["accuracy"], 4),
              "test_macro_f1_head_alone": round(head_alone["macro_f1"], 4),
              "majority_share": round(max(counts.values()) / sum(counts.values()), 4),
              "generation": generation,
              "lm_held_out_nats_per_char": lm_loss}
    save("classify_names", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
