from __future__ import annotations

import numpy as np
import pytest

from rnngen.errors import CheckpointError, InputError
from rnngen.tokenizers import REPLACEMENT, CharTokenizer, fit_tokenizer, tokenizer_from_dict

UNICODE = "Hello, wörld! 😀👍🏽 中文字符 e\u0301 ñ\r\nline two\ttab\n\n  spaces  \n"


def decode_streamed(tok, ids) -> str:
    stream = tok.stream_decoder()
    text = "".join(stream.feed(int(i)) for i in ids)
    return text + (stream.flush() if hasattr(stream, "flush") else "")


def test_char_round_trip_unicode() -> None:
    tok = CharTokenizer.fit([UNICODE])
    ids = tok.encode(UNICODE)
    assert len(ids) == len(UNICODE)  # one token per code point, combining marks included
    assert tok.decode(ids) == UNICODE
    assert decode_streamed(tok, ids) == UNICODE
    assert "\r" in tok.chars and "\u0301" in tok.chars


def test_char_unknown_and_min_count() -> None:
    tok = CharTokenizer.fit(["aaab"], min_count=2)
    assert tok.chars == ["a"]
    ids = tok.encode("abz")
    assert list(ids) == [1, tok.unk_id, tok.unk_id]
    assert tok.decode(ids) == "a" + REPLACEMENT * 2
    assert tok.count_unknown("abz") == 2


def test_char_fit_streams_chunks() -> None:
    whole = CharTokenizer.fit([UNICODE])
    chunked = CharTokenizer.fit([UNICODE[:10], UNICODE[10:]])
    assert whole.chars == chunked.chars


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_round_trip_unicode(kind: str, prose_corpus) -> None:
    text = prose_corpus.read_text("utf-8")
    tok = fit_tokenizer([text], kind, vocab_size=500)
    assert tok.vocab_size == 500
    for sample in (UNICODE, text[:2000], "  leading and trailing  ", "\n\n\n", "🙂" * 3):
        ids = tok.encode(sample)
        assert tok.decode(ids) == sample
        assert decode_streamed(tok, ids) == sample
        assert int(tok.char_lengths()[ids].sum()) == len(sample)
    assert len(tok.encode(text[:2000])) < 2000  # subwords are longer than one character
    again = tokenizer_from_dict(tok.to_dict())
    assert list(again.encode(UNICODE)) == list(tok.encode(UNICODE))


def test_char_dict_round_trip() -> None:
    tok = CharTokenizer.fit([UNICODE])
    again = tokenizer_from_dict(tok.to_dict())
    assert np.array_equal(again.encode(UNICODE), tok.encode(UNICODE))


def test_impossible_vocab_sizes_are_input_errors() -> None:
    corpus = ["tiny corpus with few characters\n" * 5]
    with pytest.raises(InputError, match="too large.*use at most"):
        fit_tokenizer(corpus, "unigram", vocab_size=5000)
    with pytest.raises(InputError, match="too small.*at least"):
        fit_tokenizer(corpus, "bpe", vocab_size=100)
    # A vocabulary chosen for the user (classify's --preset auto) shrinks to what the text can fill instead.
    with pytest.raises(InputError, match="too large.*use at most"):
        fit_tokenizer(corpus, "bpe", vocab_size=5000)
    shrunk = fit_tokenizer(corpus, "bpe", vocab_size=5000, shrink=True)
    assert 256 < shrunk.vocab_size < 5000 and shrunk.decode(shrunk.encode(corpus[0])) == corpus[0]


def test_damaged_tokenizer_data() -> None:
    with pytest.raises(CheckpointError):
        tokenizer_from_dict({"type": "bpe", "model": "bm90IGEgbW9kZWw="})
    with pytest.raises(CheckpointError):
        tokenizer_from_dict({"type": "wordpiece"})
