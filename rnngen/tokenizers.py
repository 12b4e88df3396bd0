"""Tokenizers: characters, or sentencepiece subwords (bpe|unigram) trained on the corpus.

Both share one interface: ``encode``, ``decode``, ``vocab_size``, ``stream_decoder`` (exact incremental
decoding for streaming output) and ``to_dict``/``tokenizer_from_dict`` (plain JSON-able dicts, so the
tokenizer, sentencepiece model bytes included, travels inside the checkpoint).
"""

from __future__ import annotations

import base64
import codecs
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from .errors import CheckpointError, InputError

REPLACEMENT = "\ufffd"  # how an unknown token is shown in decoded text
MAX_CODEPOINT = 0x110000


class StreamDecoder(Protocol):
    def feed(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...

    def count_unknown(self, text: str) -> int: ...

    def char_lengths(self) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a uint32 array (fast, no Python loop)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharTokenizer:
    """One token per Unicode code point; id 0 is ``<unk>`` for characters never seen in training."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise CheckpointError("char tokenizer: the character list must hold distinct single characters")
        self.chars = list(chars)
        self.itos = [REPLACEMENT] + self.chars
        # A dense code point -> id table makes encoding one numpy gather (hundreds of MB/s).
        self._table = np.zeros(MAX_CODEPOINT, dtype=np.int32)
        if self.chars:
            self._table[codepoints("".join(self.chars))] = np.arange(1, len(self.chars) + 1, dtype=np.int32)

    @classmethod
    def fit(cls, chunks: Iterable[str], min_count: int = 1) -> CharTokenizer:
        """Vocabulary of every character seen at least ``min_count`` times (rarer ones become <unk>)."""
        counts = np.zeros(MAX_CODEPOINT, dtype=np.int64)
        for chunk in chunks:
            counts += np.bincount(codepoints(chunk), minlength=MAX_CODEPOINT)
        kept = np.nonzero(counts >= max(1, min_count))[0]
        return cls([chr(int(c)) for c in kept])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def unk_id(self) -> int:
        return 0

    def encode(self, text: str) -> np.ndarray:
        return self._table[codepoints(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def stream_decoder(self) -> StreamDecoder:
        return _CharStream(self.itos)

    def count_unknown(self, text: str) -> int:
        return int(np.count_nonzero(self.encode(text) == 0))

    def char_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}


class _CharStream:
    def __init__(self, itos: list[str]) -> None:
        self.itos = itos

    def feed(self, token_id: int) -> str:
        return self.itos[token_id]


class SentencePieceTokenizer:
    """A sentencepiece model (bpe or unigram) set up for exact round trips of any Unicode text.

    Identity normalisation, no dummy prefix, kept whitespace and byte fallback mean that
    ``decode(encode(text)) == text`` for every string, newlines and emoji included.
    """

    def __init__(self, model_proto: bytes, kind: str) -> None:
        import sentencepiece as spm

        self.kind = kind
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad bytes
            raise CheckpointError(f"the sentencepiece model is corrupted ({exc}); retrain or re-download it") from None
        size = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(size)]
        self.is_byte = [self.sp.is_byte(i) for i in range(size)]
        self.is_control = [self.sp.is_control(i) for i in range(size)]

    @classmethod
    def fit(cls, chunks: Iterable[str], kind: str, vocab_size: int, shrink: bool = False) -> SentencePieceTokenizer:
        """Train on ``chunks``; with ``shrink``, a vocabulary larger than the text can fill becomes the largest
        it can (the chunks are read again: pass a re-iterable)."""
        import sentencepiece as spm

        if kind not in ("bpe", "unigram"):
            raise InputError(f"unknown sentencepiece type {kind!r}: use bpe or unigram")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(chunks), model_writer=model, vocab_size=vocab_size,
                model_type=kind, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], split_digits=True,
                unk_surface=REPLACEMENT, input_sentence_size=2_000_000, shuffle_input_sentence=True,
                max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2,
            )
        except RuntimeError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "training failed"
            if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
                raise InputError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at least "
                                 f"{match.group(1)} (256 byte pieces plus every character it uses)") from None
            if match := re.search(r"Vocabulary size too high.*?<= (\d+)", message):
                if shrink and int(match.group(1)) < vocab_size:
                    return cls.fit(chunks, kind, int(match.group(1)))
                raise InputError(f"--vocab-size {vocab_size} is too large for this corpus; use at most "
                                 f"{match.group(1)}") from None
            raise InputError(f"sentencepiece could not train on this corpus: {message}") from None
        return cls(model.getvalue(), kind)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    def encode(self, text: str) -> np.ndarray:
        # Pieces never span a newline (training saw lines, "\n" is its own symbol), so encoding
        # line by line in one batched call is exact and lets sentencepiece use several threads.
        lines = text.split("\n")
        encoded = self.sp.encode(lines)
        newline = self.sp.piece_to_id("\n")
        out: list[int] = []
        for i, ids in enumerate(encoded):
            if i:
                out.append(newline)
            out.extend(ids)
        return np.asarray(out, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        stream = self.stream_decoder()
        return "".join(stream.feed(int(i)) for i in ids) + stream.flush()

    def stream_decoder(self) -> _PieceStream:
        return _PieceStream(self)

    def count_unknown(self, text: str) -> int:
        # With byte fallback nothing is unknown; kept for the shared interface.
        return int(np.count_nonzero(self.encode(text) == self.unk_id))

    def char_lengths(self) -> np.ndarray:
        """Characters each id stands for; a byte piece counts 1 if it starts a UTF-8 character."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, piece in enumerate(self.pieces):
            if self.is_byte[i]:
                lengths[i] = 0 if 0x80 <= int(piece[3:5], 16) < 0xC0 else 1
            elif not self.is_control[i]:
                lengths[i] = 1 if i == self.unk_id else len(piece)
        return lengths

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


class _PieceStream:
    """Turns piece ids into text as they come; byte pieces are joined into UTF-8 characters."""

    def __init__(self, tok: SentencePieceTokenizer) -> None:
        self.tok = tok
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        tok = self.tok
        piece = tok.pieces[token_id]
        if tok.is_byte[token_id]:  # "<0xAB>"
            return self.bytes.decode(bytes([int(piece[3:5], 16)]))
        pending = self.bytes.decode(b"", final=True)
        if tok.is_control[token_id]:
            return pending
        if token_id == tok.unk_id:
            return pending + REPLACEMENT
        return pending + piece.replace("\u2581", " ")

    def flush(self) -> str:
        return self.bytes.decode(b"", final=True)


def _lines(chunks: Iterable[str], max_chars: int = 1 << 14) -> Iterator[str]:
    """The lines of the text for sentencepiece training, cut to at most ``max_chars`` characters.

    sentencepiece skips a line longer than its max_sentence_length (64 KiB) whole; cutting keeps
    its text, and keeps memory bounded when the corpus has no newlines at all.
    """
    rest = ""
    for chunk in chunks:
        lines = (rest + chunk).split("\n")
        rest = lines.pop()
        cut = len(rest) - len(rest) % max_chars
        lines += [rest[i: i + max_chars] for i in range(0, cut, max_chars)]
        rest = rest[cut:]
        yield from (line[i: i + max_chars] for line in lines for i in range(0, len(line), max_chars))
    if rest:
        yield rest


def fit_tokenizer(chunks: Iterable[str], kind: str = "char", vocab_size: int = 2000,
                  min_char_count: int = 1, shrink: bool = False) -> Tokenizer:
    """Train the tokenizer ``kind`` (char, bpe or unigram) on the text chunks (``shrink``: see
    SentencePieceTokenizer.fit)."""
    if kind == "char":
        return CharTokenizer.fit(chunks, min_count=min_char_count)
    return SentencePieceTokenizer.fit(chunks, kind, vocab_size, shrink)


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``to_dict`` output (as stored in a checkpoint)."""
    kind = data.get("type")
    try:
        if kind == "char":
            return CharTokenizer(list(data["chars"]))
        if kind in ("bpe", "unigram"):
            return SentencePieceTokenizer(base64.b64decode(data["model"], validate=True), kind)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the tokenizer data is damaged ({exc!r}); retrain the model") from None
    raise CheckpointError(f"unknown tokenizer type {kind!r} in checkpoint; is it from a newer rnngen?")
