"""Corpora larger than RAM, on a small scale: every stage streams, and streaming changes nothing.

The timing and the 2 GB run are in benchmarks/large_corpus.py; these check the properties that make
it work: chunked tokenising gives the tokens of the whole text, text without newlines is cut into
bounded pieces, and evaluating a long validation split reads it window by window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from rnngen.corpora import CHUNK_BYTES, Corpus
from rnngen.data import _line_chunks, tokenize_to_file
from rnngen.tokenizers import _lines, fit_tokenizer

# Several read chunks' worth of text whose multi-byte characters and CRLF pairs straddle the chunk
# boundaries (the line lengths do not divide the chunk size).
LINE = "naïve café — Ἀθῆναι 東京 🙂 plain ascii words, then more\r\n"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_char_tokens_in_chunks_equal_encoding_at_once(tmp_path: Path) -> None:
    text = LINE * (3 * CHUNK_BYTES // len(LINE.encode()) + 7)  # ~12 MB, 3+ chunks
    corpus = Corpus((write(tmp_path / "c.txt", text),))
    tok = fit_tokenizer(corpus.chunks(), "char")
    tokens = tokenize_to_file(corpus, tok, tmp_path / "cache")
    assert len(tokens) == len(text) and tokens.dtype == np.uint8  # one byte a token (34 symbols)
    np.testing.assert_array_equal(tokens, tok.encode(text))
    wide = "".join(chr(0x4E00 + i) for i in range(300)) + "\n"  # more symbols than a byte holds
    corpus = Corpus((write(tmp_path / "wide.txt", wide * 100),))
    tok = fit_tokenizer(corpus.chunks(), "char")
    tokens = tokenize_to_file(corpus, tok, tmp_path / "cache")
    assert tokens.dtype == np.uint16 and tok.decode(tokens) == wide * 100


def test_text_without_newlines_streams_exactly(tmp_path: Path) -> None:
    text = LINE.replace("\r\n", " ") * (2 * CHUNK_BYTES // len(LINE.encode()))  # ~8 MB on one line
    corpus = Corpus((write(tmp_path / "c.txt", text),))
    tok = fit_tokenizer(corpus.chunks(), "char")
    np.testing.assert_array_equal(tokenize_to_file(corpus, tok, tmp_path / "cache"), tok.encode(text))
    # The re-cutting for subwords and the lines for sentencepiece training stay bounded, and lose nothing.
    pieces = list(_line_chunks(corpus.chunks(), min_chars=1 << 20, max_chars=1 << 21))
    assert "".join(pieces) == text and max(map(len, pieces)) <= (1 << 21) + CHUNK_BYTES
    lines = list(_lines(corpus.chunks(), max_chars=5000))
    assert "".join(lines) == text and max(map(len, lines)) <= 5000


def test_subword_tokens_in_chunks_equal_encoding_at_once(tmp_path: Path) -> None:
    from rnngen.corpora import builtin_text

    text = (builtin_text() * 10)[: 3 * CHUNK_BYTES // 2]  # ~6 MB: the token file is written in 2+ pieces
    corpus = Corpus((write(tmp_path / "c.txt", text),))
    tok = fit_tokenizer(Corpus((write(tmp_path / "small.txt", text[:300_000]),)).chunks(), "bpe", 400)
    np.testing.assert_array_equal(tokenize_to_file(corpus, tok, tmp_path / "cache"), tok.encode(text))


EVAL_MEMORY = """
import json, resource, sys
import numpy as np
from rnngen.data import eval_windows

tokens = np.memmap(sys.argv[1], dtype=np.uint16, mode="r")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, scored, total = peak(), 0, 0
for x, y in eval_windows(tokens, seq_len=256):
    scored += y.numel()
    total += int(y.sum())
print(json.dumps({"growth": peak() - before, "scored": scored, "total": total}))
"""


def test_evaluation_reads_a_long_split_window_by_window(tmp_path: Path) -> None:
    """50M validation tokens (100 MB on disk, 400 MB as the int64 the model reads): the evaluator's
    memory grows by at most the file's own pages, not by a copy of the split."""
    n = 50_000_001
    path = tmp_path / "val.tokens"
    np.arange(n, dtype=np.uint16).tofile(path)  # 0, 1, ..., 65535, 0, 1, ...
    proc = subprocess.run([sys.executable, "-c", EVAL_MEMORY, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    lanes, lane_len = 16, (n - 1) // 16
    assert result["scored"] == lanes * lane_len  # every target read (all of them but the remainder)
    expected = sum(int((np.arange(i * lane_len + 1, (i + 1) * lane_len + 1) % 65536).sum()) for i in range(lanes))
    assert result["total"] == expected
    assert result["growth"] < 250e6, f"evaluation grew by {result['growth'] / 1e6:.0f} MB"
