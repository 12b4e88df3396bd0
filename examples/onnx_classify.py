"""Classify texts with a classifier folder written by `rnngen export`, with onnxruntime and numpy alone.

    python examples/onnx_classify.py exported/mine "some text" "another text"
    python examples/onnx_classify.py exported/mine --file texts.txt        # one text per line

It follows the folder's README.md: each text's first ids after the start ids, and (where the classifier has
one) the hashed bag of n-grams of the whole lower-cased text, through classifier.onnx; it prints each text's
most likely class and its probability, as `rnngen classify predict` does (the `scores` output: with the
checkpoint's vote of the language model). Subword folders need the `sentencepiece` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_sample import OnnxLM  # noqa: E402  (the folder's config and tokenizer)


def ngram_hashes(ids: np.ndarray, ngrams: int, seed: int, multiplier: int) -> list[np.ndarray]:
    """The hashes of the 1- to n-grams of ``ids``, before the final mixing (config.json's `bag`)."""
    grams = []
    for n in range(1, ngrams + 1):
        if len(ids) < n:
            break
        h = np.full(len(ids) - n + 1, n * seed, dtype=np.int64)
        for k in range(n):
            h = h * np.int64(multiplier) + ids[k: len(ids) - n + 1 + k]  # wraps around at 2^64, on purpose
        grams.append(h)
    return grams


def bag_of_ngrams(ids: list[int], text: str, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The buckets of a lower-cased text's n-grams of ids and of characters, and how often each occurs."""
    grams = ngram_hashes(np.asarray(ids, np.int64), spec["ngrams"], spec["seed"], spec["multiplier"])
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    grams += ngram_hashes(points, spec["char_ngrams"], spec["char_seed"], spec["multiplier"])
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    hashed = np.concatenate(grams)
    hashed ^= hashed >> spec["shift"]
    buckets, counts = np.unique(np.mod(hashed, spec["buckets"]), return_counts=True)
    return buckets, counts.astype(np.float32)


class OnnxClassifier:
    """classifier.onnx with its folder's config and tokenizer."""

    def __init__(self, folder: str | Path) -> None:
        self.lm = OnnxLM(folder)  # config.json and the tokenizer
        self.spec: dict[str, Any] = self.lm.config["classifier"]
        self.session = ort.InferenceSession(str(self.lm.folder / self.spec["file"]), providers=["CPUExecutionProvider"])

    def feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The classifier's inputs for ``texts``: right-padded ids and lengths, and the bags if it reads them."""
        encode, unk = self.lm.codec.encode, int(self.lm.config["tokenizer"]["unk_id"])
        seqs = [self.spec["start_ids"] + (encode(t)[: self.spec["max_len"]] or [unk]) for t in texts]
        tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
        for i, seq in enumerate(seqs):
            tokens[i, : len(seq)] = seq
        feeds = {"tokens": tokens, "lengths": np.array([len(s) for s in seqs], np.int64)}
        if self.spec.get("bag"):
            bags = [bag_of_ngrams(encode(t.lower()), t.lower(), self.spec["bag"]) for t in texts]
            width = max(1, max(len(b) for b, _ in bags))
            feeds["bag_ids"] = np.zeros((len(bags), width), np.int64)
            feeds["bag_counts"] = np.zeros((len(bags), width), np.float32)  # padding: count 0
            for i, (buckets, counts) in enumerate(bags):
                feeds["bag_ids"][i, : len(buckets)], feeds["bag_counts"][i, : len(counts)] = buckets, counts
        return feeds

    def probabilities(self, texts: list[str], vote: bool = True) -> np.ndarray:
        """(N, C) class probabilities: with the checkpoint's vote of the language model, or the head's alone."""
        logits, scores = self.session.run(["logits", "scores"], self.feeds(texts))
        x = scores if vote else logits
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="A folder written by `rnngen export` from a classifier checkpoint.")
    parser.add_argument("texts", nargs="*", help="Texts to classify.")
    parser.add_argument("--file", help="A UTF-8 file of texts, one per line.")
    args = parser.parse_args()
    texts = list(args.texts)
    if args.file:
        texts += Path(args.file).read_text(encoding="utf-8").splitlines()
    if not texts:
        parser.error("give texts to classify, or --file")
    classifier = OnnxClassifier(args.folder)
    classes = classifier.spec["classes"]
    for text, probs in zip(texts, classifier.probabilities(texts)):
        best = int(probs.argmax())
        print(f"{classes[best]}\t{probs[best]:.4f}\t{text}")


if __name__ == "__main__":
    main()
