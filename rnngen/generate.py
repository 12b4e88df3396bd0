"""Sampling: a generator of text pieces, one recurrent step per new token (the state is carried)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, run_dir_of
from .config import SampleConfig
from .errors import InputError
from .model import RNNModel, State
from .tokenizers import Tokenizer


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top-p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, config: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


class StopScanner:
    """Finds stop strings in streamed text, holding back only what could still begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Text that is safe to show now, and whether a stop string was reached."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


@dataclass
class Cursor:
    """Where a text stream stands: the recurrent state and the logits for the next token."""

    state: State | None
    logits: torch.Tensor  # (1, V)


class Generator:
    """A loaded model and tokenizer, ready to generate and evaluate text."""

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, config: dict[str, Any], directory: Path) -> None:
        self.model, self.tokenizer, self.config, self.directory = model, tokenizer, config, directory
        self.device = next(model.parameters()).device
        if model.config.bidirectional:
            raise InputError("this checkpoint has a bidirectional encoder, which can classify but not "
                             "generate; use a unidirectional model for text generation")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> Generator:
        model, tokenizer, config, directory = load_checkpoint(path, device)
        return cls(model, tokenizer, config, directory)

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.directory)

    def unknown_characters(self, text: str) -> int:
        """How many characters of ``text`` the tokenizer cannot represent (they become <unk>)."""
        return self.tokenizer.count_unknown(text)

    def _start_ids(self, prompt: str) -> list[int]:
        if prompt:
            ids = [int(i) for i in self.tokenizer.encode(prompt)]
            if all(i == self.tokenizer.unk_id for i in ids):
                raise InputError("the prompt has no character this model knows; use characters from its "
                                 "training text (see `rnngen info`)")
            return ids
        # No prompt: start as if at the beginning of a paragraph.
        newline = [int(i) for i in self.tokenizer.encode("\n")]
        return newline if newline and newline[0] != self.tokenizer.unk_id else [self.tokenizer.vocab_size - 1]

    @torch.inference_mode()
    def feed(self, ids: Sequence[int], state: State | None = None) -> Cursor:
        """Read ``ids`` in one call from ``state``; the cursor is ready to predict what follows."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits, state = self.model(x, state)
        return Cursor(state, logits[:, -1])

    def start(self, prompt: str = "") -> Cursor:
        return self.feed(self._start_ids(prompt))

    @torch.inference_mode()
    def continue_from(self, cursor: Cursor, config: SampleConfig,
                      generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield text pieces after ``cursor`` (advancing it) until ``config.length`` tokens or a stop string."""
        generator = generator or make_generator(config.seed, self.device)
        decoder = self.tokenizer.stream_decoder()
        scanner = StopScanner(config.stop)
        for _ in range(config.length):
            token = pick_tokens(cursor.logits, config, generator)  # (1,)
            logits, cursor.state = self.model(token.view(1, 1), cursor.state)
            cursor.logits = logits[:, -1]
            text, stopped = scanner.push(decoder.feed(int(token)))
            if text:
                yield text
            if stopped:
                return
        flush = getattr(decoder, "flush", None)
        text, _ = scanner.push(flush() if flush else "")
        if rest := text + scanner.flush():
            yield rest

    def generate(self, prompt: str = "", length: int = 500, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, stop: Sequence[str] = (),
                 seed: int | None = None) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece (the prompt itself is not repeated)."""
        config = SampleConfig(temperature, top_k, top_p, greedy, length, tuple(stop), seed)
        cursor = self.start(prompt)
        yield from self.continue_from(cursor, config)

    def sample(self, prompt: str = "", **options: Any) -> str:
        """The whole continuation of ``prompt`` as one string (see ``generate`` for the options)."""
        return "".join(self.generate(prompt, **options))

    def evaluate(self, text: str) -> dict[str, float]:
        """Loss of ``text`` under the model: nats/token, nats/char, bits/char, perplexity."""
        from .train import evaluate

        tokens = self.tokenizer.encode(text)
        if len(tokens) < 2:
            raise InputError("the text is too short to evaluate; give it at least two characters")
        result = evaluate(self.model, tokens, self.tokenizer.char_lengths(), self.device)
        return {**result, "unknown_characters": self.unknown_characters(text)}

