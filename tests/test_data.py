from __future__ import annotations

import codecs

import numpy as np
import pytest
import torch

from rnngen.corpora import Corpus, check_readable_file, resolve_corpus
from rnngen.data import StreamBatches, TokenSplit, eval_windows, tokenize_to_file
from rnngen.errors import InputError
from rnngen.tokenizers import CharTokenizer, fit_tokenizer


def test_batches_continue_each_lane() -> None:
    """Window i+1 of every lane starts where window i ended: the carried state is the right one."""
    tokens = np.arange(5000, dtype=np.uint16)
    batches = StreamBatches(tokens, batch_size=4, seq_len=16, seed=0)
    x0, y0 = batches.batch(epoch=0, index=0)
    x1, _ = batches.batch(epoch=0, index=1)
    assert x0.shape == (4, 16)
    assert torch.equal(x1[:, 0], y0[:, -1])
    assert torch.equal(y0, x0 + 1)  # targets are the next tokens
    lanes = x0[:, 0]
    assert len(set(lanes.tolist())) == 4 and bool((lanes[1:] > lanes[:-1]).all())


def test_batches_deterministic_and_shifted_per_epoch() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    a = StreamBatches(tokens, 4, 16, seed=3)
    b = StreamBatches(tokens, 4, 16, seed=3)
    assert torch.equal(a.batch(2, 5)[0], b.batch(2, 5)[0])
    starts = {int(a.batch(epoch, 0)[0][0, 0]) for epoch in range(8)}
    assert len(starts) > 1  # windows differ between epochs


def test_batches_split_lanes_between_ranks() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    whole = StreamBatches(tokens, 4, 16, seed=0).batch(1, 2)[0]
    parts = [StreamBatches(tokens, 4, 16, seed=0, rank=r, world_size=2).batch(1, 2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_corpus_too_short_for_a_batch() -> None:
    with pytest.raises(InputError, match="too few"):
        StreamBatches(np.arange(100, dtype=np.uint16), 8, 32, seed=0)


def test_eval_windows_cover_every_token_once() -> None:
    tokens = np.arange(1001, dtype=np.uint16)
    targets = torch.cat([y.flatten() for _, y in eval_windows(tokens, seq_len=30, lanes=4)])
    assert sorted(targets.tolist()) == list(range(1, 1001))


def test_tokenize_to_file_is_cached_and_exact(tmp_path) -> None:
    text = "some text\nwith lines\n" * 100
    path = tmp_path / "c.txt"
    path.write_text(text)
    corpus = Corpus((path,))
    tok = CharTokenizer.fit(corpus.chunks())
    tokens = tokenize_to_file(corpus, tok, tmp_path / "tokens")
    assert tok.decode(tokens) == text
    again = tokenize_to_file(corpus, tok, tmp_path / "tokens")
    assert again.filename == tokens.filename and len(list((tmp_path / "tokens").iterdir())) == 1
    split = TokenSplit.from_tokens(tokens, 0.1)
    assert len(split.train) == int(0.9 * len(text)) and len(split.train) + len(split.val) == len(text)


def test_subword_tokenize_to_file_in_chunks(tmp_path, prose_corpus) -> None:
    corpus = Corpus((prose_corpus,))
    tok = fit_tokenizer(corpus.chunks(), "bpe", 400)
    tokens = tokenize_to_file(corpus, tok, tmp_path / "tokens")
    assert tok.decode(tokens) == prose_corpus.read_text("utf-8")


def test_several_files_joined_with_newlines(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second\n")
    corpus = resolve_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert corpus.read() == "first\nsecond\n"


def test_a_folder_is_read_file_by_file_in_path_order(tmp_path) -> None:
    """Every file in the folder and its sub-folders, sorted by path; hidden and empty ones skipped."""
    root = tmp_path / "books"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    for name, text in (("b/two.txt", "second"), ("a.txt", "first\n"), ("c.md", "third"), (".notes", "hidden"),
                       (".git/config", "hidden too"), ("empty.txt", "")):
        (root / name).write_text(text, encoding="utf-8")
    corpus = resolve_corpus([str(root), str(root / "c.md")])
    assert [p.name for p in corpus.paths] == ["a.txt", "two.txt", "c.md", "c.md"]
    assert corpus.read() == "first\nsecond\nthird\nthird" and corpus.describe() == "books/ (3 files), c.md"
    (root / "bin.dat").write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match="bin.dat contains NUL bytes"):
        resolve_corpus([str(root)]).read()


def test_builtin_corpus_is_prose() -> None:
    text = resolve_corpus([]).read()
    assert 300_000 < len(text) < 2_000_000 and "the" in text
    lines = text.splitlines()
    # What made a cold sample at a low temperature all spaces: indentation by runs of spaces, aligned columns.
    assert not any(line.startswith(" ") for line in lines) and "   " not in text and "::=" not in text
    assert "\n\n\n" not in text
    # Code keeps its structure, a tab per level: the for statement's example, indented as in its help page.
    assert "for i in range(10):\n\tprint(i)\n" in text


def test_indented_blocks_go_to_the_margin_with_a_tab_per_level() -> None:
    from rnngen.corpora import _page_text

    page = ("Prose:\n\n   def f(x):\n       return x  # aligned     comment\n\n   f(1)\n\n"
            "stmt ::= a\n         | b\n\nMore prose.\n+----+\n| ab |\n+----+\n")
    assert _page_text(page) == "Prose:\n\ndef f(x):\n\treturn x  # aligned  comment\n\nf(1)\n\nMore prose."


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"  \n\t \n", "whitespace"),
    (b"text\x00\x01binary", "NUL bytes"),
    (b"good text \xff\xfe bad", "not valid utf-8 at byte 10"),
    (codecs.BOM_UTF16_LE + "hello".encode("utf-16-le"), "--encoding utf-16"),
])
def test_bad_corpus_files(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        resolve_corpus([str(path)]).read()


def test_invalid_utf8_offset_across_chunks(tmp_path) -> None:
    from rnngen.corpora import iter_file_text

    path = tmp_path / "bad.txt"
    path.write_bytes(b"a" * 1000 + "é".encode() + b"\xff" + b"b" * 10)
    with pytest.raises(InputError, match="at byte 1002"):
        list(iter_file_text(path, chunk_bytes=7))


def test_encoding_and_replace_options(tmp_path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("café crème".encode("latin-1"))
    assert resolve_corpus([str(path)], encoding="latin-1").read() == "café crème"
    assert resolve_corpus([str(path)], errors="replace").read() == "caf\ufffd cr\ufffdme"
    utf16 = tmp_path / "u16.txt"
    utf16.write_text("héllo", encoding="utf-16")
    assert resolve_corpus([str(utf16)], encoding="utf-16").read() == "héllo"


def test_paths_that_are_not_files(tmp_path) -> None:
    import os

    with pytest.raises(InputError, match="not found"):
        check_readable_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="directory"):
        check_readable_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        check_readable_file(fifo)
