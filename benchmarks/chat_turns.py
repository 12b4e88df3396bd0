"""Time per chat turn as the conversation grows: `rnngen chat` carries the recurrent state, so turn 50
costs what turn 1 costs for the same number of new tokens.

A random LSTM (2x256, embedding 128, 100 printable characters), fixed seed. Each turn: a line of
--line-chars characters, then exactly --reply-tokens generated tokens (no stop string). The conversation
of --turns turns is repeated --repeats times; each turn's time is the median over the repeats.
For comparison, the naive way at the last turn: re-read the whole conversation, then generate.

    python benchmarks/chat_turns.py                          # the recorded run
    python benchmarks/chat_turns.py --turns 10 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

import rnngen  # noqa: E402
from rnngen.chat import ChatSession  # noqa: E402
from rnngen.checkpoint import save_checkpoint  # noqa: E402
from rnngen.config import ModelConfig, SampleConfig  # noqa: E402
from rnngen.model import RNNModel  # noqa: E402
from rnngen.tokenizers import CharTokenizer  # noqa: E402

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, ")


def line(i: int, chars: int) -> str:
    """The i-th user line: a different slice of TEXT each turn, always ``chars`` characters."""
    start = (i * 37) % len(TEXT)
    return ((TEXT * 3)[start:start + chars]).strip().ljust(chars, ".")


def timed_turn(session: ChatSession, text: str) -> float:
    t0 = time.perf_counter()
    for _ in session.handle(text):
        pass
    return time.perf_counter() - t0


def naive_turn(gen: rnngen.loaded.LoadedModel, conversation: str, config: SampleConfig) -> float:
    """What a turn costs when the whole conversation is re-read from a fresh state first."""
    t0 = time.perf_counter()
    cursor = gen.feed([int(i) for i in gen.tokenizer.encode(conversation)])
    for _ in gen.continue_from(cursor, config):
        pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--line-chars", type=int, default=40)
    parser.add_argument("--reply-tokens", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    tok = CharTokenizer.fit([string.printable])
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=args.hidden, layers=args.layers, emb_dim=128))
    config = SampleConfig(temperature=0.8, length=args.reply_tokens, stop=(), seed=0)
    per_turn: list[list[float]] = [[] for _ in range(args.turns)]
    naive: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ck", model, tok, {})
        gen = rnngen.load(str(Path(tmp) / "ck"), device=args.device)
        for _ in range(2):  # warm-up: allocator, thread pool, first-call overheads
            timed_turn(ChatSession(gen, config), line(0, args.line_chars))
        for _ in range(args.repeats):
            session = ChatSession(gen, config)
            for i in range(args.turns):
                if i == args.turns - 1:  # the naive way, from the same conversation, just before our turn
                    text = "\n" + session.context() + session.format_input(line(i, args.line_chars))
                    naive.append(naive_turn(gen, text, config))
                    context_tokens = len(gen.tokenizer.encode(text))
                per_turn[i].append(timed_turn(session, line(i, args.line_chars)))
            assert all(t.ended == "length" for t in session.turns)  # every turn generated the same count
    medians = [statistics.median(t) * 1000 for t in per_turn]
    first, last, naive_ms = medians[0], medians[-1], statistics.median(naive) * 1000
    record = {
        "benchmark": "chat_turns",
        "model": f"random lstm {args.layers}x{args.hidden}, emb 128, vocab {tok.vocab_size}",
        "parameters": model.num_parameters(), "device": args.device, "threads": torch.get_num_threads(),
        "turns": args.turns, "repeats": args.repeats,
        "new_tokens_per_turn": {"line": args.line_chars, "reply": args.reply_tokens},
        "turn_1_ms": round(first, 2), f"turn_{args.turns}_ms": round(last, 2),
        "ratio_last_vs_first": round(last / first, 3), "flat": last <= 1.2 * first,
        f"naive_turn_{args.turns}_ms": round(naive_ms, 2), "naive_context_tokens": context_tokens,
        "naive_over_carried": round(naive_ms / last, 2),
        "median_ms_per_turn": [round(m, 2) for m in medians],
    }
    print(json.dumps(record))
    save("chat_turns", record)


if __name__ == "__main__":
    main()
