"""Sample text from a folder written by `rnngen export`, with onnxruntime and numpy alone (no torch, no rnngen).

    python examples/onnx_sample.py exported/mine --prompt "It was" --length 300 --top-p 0.9 --seed 1
    python examples/onnx_sample.py exported/mine --greedy -n 300     # the text of `rnngen sample --greedy`

It follows the folder's README.md: read the prompt (or, with none, a newline) through model.onnx, then
one call per new token with the recurrent state carried; label tokens are never drawn; temperature, top-k
and top-p filter the logits as `rnngen sample` does. The text streams to stdout, prompt first, then a
newline at the end, as `rnngen sample` prints it. Subword folders need the `sentencepiece` package.
Draws use numpy's random numbers, so a seeded sample differs from rnngen's for the same seed; greedy
decoding gives the same text.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPLACEMENT = "\ufffd"


class CharCodec:
    """tokenizer.json of a character model: one id per character, id 0 for characters it never saw."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.vocab: list[str] = spec["vocab"]
        self.unk_id = int(spec["unk_id"])
        self.ids = {ch: i for i, ch in enumerate(self.vocab) if i != self.unk_id}

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(ch, self.unk_id) for ch in text]

    def decoder(self) -> CharDecoder:
        return CharDecoder(self.vocab)


class CharDecoder:
    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def feed(self, token: int) -> str:
        return self.vocab[token]

    def flush(self) -> str:
        return ""


class PieceCodec:
    """tokenizer.json of a subword model: sentencepiece encodes line by line; the pieces table decodes."""

    def __init__(self, spec: dict[str, Any], folder: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(folder / spec["model_file"]))
        self.pieces: list[dict[str, Any]] = spec["pieces"]
        self.newline_id = int(spec["newline_id"])

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, line in enumerate(self.sp.encode(text.split("\n"))):
            ids += ([self.newline_id] if i else []) + list(line)
        return ids

    def decoder(self) -> PieceDecoder:
        return PieceDecoder(self.pieces)


class PieceDecoder:
    """Pieces to text as they come; runs of byte pieces are decoded as UTF-8 (invalid bytes: U+FFFD)."""

    def __init__(self, pieces: list[dict[str, Any]]) -> None:
        self.pieces = pieces
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        piece = self.pieces[token]
        if piece["kind"] == "byte":
            return self.bytes.decode(bytes([piece["byte"]]))
        return self.bytes.decode(b"", final=True) + piece["text"]

    def flush(self) -> str:
        return self.bytes.decode(b"", final=True)


class OnnxLM:
    """model.onnx with its config.json: a call reads tokens from a state and returns logits and the new state."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / self.config["onnx"]["file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.state_names: list[str] = self.config["onnx"]["state"]
        self.outputs = ["logits", *(f"{n}_out" for n in self.state_names)]
        spec = json.loads((self.folder / "tokenizer.json").read_text(encoding="utf-8"))
        self.codec = CharCodec(spec) if spec["type"] == "char" else PieceCodec(spec, self.folder)
        self.never_from = int(self.config["sampling"]["never_sample_from_id"])  # label tokens from here on

    def initial_state(self, batch: int = 1) -> list[np.ndarray]:
        model = self.config["model"]
        return [np.zeros((model["layers"], batch, model["hidden"]), np.float32) for _ in self.state_names]

    def run(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, T, V) after each of ``tokens`` (B, T) and the state after the last one."""
        feeds = {"tokens": tokens.astype(np.int64, copy=False), **dict(zip(self.state_names, state))}
        logits, *new_state = self.session.run(self.outputs, feeds)
        return logits, new_state


def filter_logits(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """-inf outside the top-k and outside the smallest set of most likely tokens with mass >= top-p."""
    logits = logits.copy()
    if top_k is not None and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        ranked = logits[order]
        probs = np.exp(ranked - ranked[0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # mass of the tokens ranked above each one: the first is always kept
        logits[order[before >= top_p]] = -np.inf
    return logits


def pick(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
         rng: np.random.Generator) -> int:
    """The next id from one position's logits (V,)."""
    if greedy:
        return int(np.argmax(logits))
    scaled = filter_logits(logits.astype(np.float64) / temperature, top_k, top_p)
    probs = np.exp(scaled - scaled.max())
    return int(np.argmax(probs / rng.exponential(size=probs.shape)))  # a draw from probs / probs.sum()


def generate(lm: OnnxLM, prompt: str = "", length: int = 500, temperature: float = 0.8, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, seed: int | None = None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, one model call per new token."""
    rng = np.random.default_rng(seed)
    start = lm.codec.encode(prompt) if prompt else lm.config["sampling"]["no_prompt_ids"]
    logits, state = lm.run(np.asarray([start], np.int64), lm.initial_state())
    decoder = lm.codec.decoder()
    token = np.zeros((1, 1), np.int64)
    for _ in range(length):
        last = logits[0, -1]
        last[lm.never_from:] = -np.inf  # label tokens only ever begin a labelled text
        token[0, 0] = pick(last, temperature, top_k, top_p, greedy, rng)
        if piece := decoder.feed(int(token[0, 0])):
            yield piece
        logits, state = lm.run(token, state)
    if rest := decoder.flush():
        yield rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="A folder written by `rnngen export`.")
    parser.add_argument("--prompt", "-p", default="", help="Text to start from (\\n for a newline); printed first.")
    parser.add_argument("--length", "-n", type=int, default=500, help="Tokens to generate.")
    parser.add_argument("--temperature", "-t", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, help="Sample only from the k most likely tokens.")
    parser.add_argument("--top-p", type=float, help="Nucleus sampling: the smallest set with this mass.")
    parser.add_argument("--greedy", action="store_true", help="Always take the most likely token.")
    parser.add_argument("--seed", type=int, help="Same seed, same text.")
    parser.add_argument("--threads", type=int, help="onnxruntime's threads [default: its own choice].")
    args = parser.parse_args()
    if args.temperature <= 0 or (args.top_k is not None and args.top_k < 1) or \
            (args.top_p is not None and not 0 < args.top_p <= 1) or args.length < 0:
        parser.error("need --temperature > 0, --top-k >= 1, 0 < --top-p <= 1 and --length >= 0")
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    lm = OnnxLM(args.folder, args.threads)
    sys.stdout.write(prompt)
    for piece in generate(lm, prompt, args.length, args.temperature, args.top_k, args.top_p, args.greedy, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
