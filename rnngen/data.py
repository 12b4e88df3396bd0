"""Token streams on disk and the batches cut from them.

Tokenising streams the corpus in chunks into a memory-mapped token file in the cache, keyed by the
corpus content and the tokenizer, so a corpus larger than RAM trains and a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpora import Corpus, cache_dir
from .errors import InputError
from .tokenizers import Tokenizer


def _line_chunks(chunks: Iterator[str], min_chars: int = 1 << 22, max_chars: int = 1 << 26) -> Iterator[str]:
    """Re-cut text chunks at newlines (subword pieces never span one), each at least ``min_chars``.

    Text with no newline in ``max_chars`` characters is cut anyway, so that memory stays bounded
    (a subword piece may then be split in two at that point).
    """
    rest = ""
    for chunk in chunks:
        rest += chunk
        if len(rest) >= min_chars:
            cut = rest.rfind("\n") + 1 or (len(rest) if len(rest) >= max_chars else 0)
            if cut:
                yield rest[:cut]
                rest = rest[cut:]
    if rest:
        yield rest


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type for the ids: one byte a token for most character vocabularies."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_to_file(corpus: Corpus, tokenizer: Tokenizer, directory: Path | None = None,
                     fingerprint: str | None = None) -> np.ndarray:
    """Encode ``corpus`` into a cached token file and return it memory-mapped (read-only).

    ``fingerprint`` is ``corpus.fingerprint()`` when the caller already has it (it reads every byte).
    """
    tok_hash = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()
    key = hashlib.sha256(f"{fingerprint or corpus.fingerprint()}|{tok_hash}".encode()).hexdigest()[:32]
    directory = directory or cache_dir() / "tokens"
    dtype = token_dtype(tokenizer.vocab_size)
    path = directory / f"{key}.{dtype.name}.tokens"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        # Characters are encoded one by one, so any cut will do; subwords need cuts at newlines.
        chunks = corpus.chunks() if tokenizer.kind == "char" else _line_chunks(corpus.chunks())
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(tokenizer.encode(chunk).astype(dtype).tobytes())
        os.replace(tmp, path)  # a half-written cache file never looks complete
    if path.stat().st_size == 0:
        raise InputError(f"{corpus.describe()} holds no text; pass a file with text in it")
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenSplit:
    """The corpus tokens and where validation starts (the last ``val_fraction``, as nanoGPT does)."""

    tokens: np.ndarray
    n_train: int

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float) -> TokenSplit:
        return cls(tokens, int(len(tokens) * (1.0 - val_fraction)))

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.n_train]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.n_train:]


def mixed_seed(seed: int, *keys: int) -> int:
    """One seed for the draw named by ``keys`` (an epoch, a window) under the run's ``seed``: fixed draws
    make a resumed run, and every rank of a distributed one, see what an uninterrupted run would."""
    for key in keys:
        seed = seed * 1_000_003 + key
    return seed % (1 << 63)  # within what torch and numpy generators accept


class StreamBatches:
    """Batches for truncated backpropagation through time, with the state carried between windows.

    The training tokens are cut into ``batch_size`` lanes read side by side; batch ``i`` of an epoch
    holds window ``i`` of every lane, so the state left by batch ``i`` is the right one for ``i + 1``::

        lane 0: | w0 | w1 | w2 | ...        x = tokens[s : s+T],  y = tokens[s+1 : s+T+1]
        lane 1: | w0 | w1 | w2 | ...
        ...

    Each epoch starts the lanes at a shift drawn from (seed, epoch), so windows differ between epochs
    and a resumed run sees exactly the batches the uninterrupted run would have seen. With several
    processes, rank ``r`` takes its own slice of the lanes (``batch_size`` is the global batch).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        if batch_size % world_size:
            raise InputError(f"--batch-size {batch_size} (the global batch) does not split evenly between "
                             f"{world_size} processes; use a multiple of {world_size}")
        self.lanes = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        need = batch_size * (2 * seq_len + 1)
        if len(tokens) < need:
            raise InputError(f"the training split has {len(tokens):,} tokens, too few for batches of "
                             f"{batch_size} x {seq_len}; use a longer corpus or a smaller --batch-size/--seq-len")

    def _layout(self, epoch: int) -> tuple[int, int, int]:
        gen = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
        shift = int(torch.randint(self.seq_len, (1,), generator=gen))
        lane_len = (len(self.tokens) - 1 - shift) // self.batch_size
        return shift, lane_len, lane_len // self.seq_len

    def steps_in_epoch(self, epoch: int) -> int:
        return self._layout(epoch)[2]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``index`` of every lane of this rank: inputs and targets, both (B, T) int64."""
        shift, lane_len, _ = self._layout(epoch)
        T = self.seq_len
        starts = [shift + lane * lane_len + index * T for lane in range(self.batch_size)][self.lanes]
        block = np.stack([self.tokens[s: s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        block_t = torch.from_numpy(block)
        return block_t[:, :-1], block_t[:, 1:]

    def fresh_lanes(self, epoch: int, index: int, share: float) -> torch.Tensor:
        """Which of this rank's lanes start window ``index`` from a fresh state (bool, (B,)): a ``share`` of
        all lanes drawn from (seed, epoch, index), so every rank and a resumed run draw the same."""
        gen = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, index))
        return (torch.rand(self.batch_size, generator=gen) < share)[self.lanes]


def eval_windows(tokens: np.ndarray, seq_len: int, lanes: int = 16, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows over all of ``tokens`` in ``lanes`` parallel lanes (state to be carried between them).

    Each window is read from ``tokens`` (a memory map for a big corpus) as it is needed, so memory
    stays bounded however long the text is. With several processes, rank ``r`` reads its own share
    of the lanes (possibly none).
    """
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < 2:
        raise InputError("the validation split is too short to evaluate; use a longer corpus or a larger "
                         "--val-fraction")
    lanes = max(1, min(lanes, (len(tokens) - 1) // seq_len))
    lane_len = (len(tokens) - 1) // lanes
    mine = range(rank * lanes // world_size, (rank + 1) * lanes // world_size)
    if not mine:
        return
    for start in range(0, lane_len, seq_len):
        end = min(start + seq_len, lane_len)
        rows = np.stack([tokens[i * lane_len + start: i * lane_len + end + 1] for i in mine]).astype(np.int64)
        block = torch.from_numpy(rows)  # (lanes, T+1)
        yield block[:, :-1], block[:, 1:]
