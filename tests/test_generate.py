from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen.checkpoint import save_checkpoint
from rnngen.config import ModelConfig, SampleConfig
from rnngen.errors import InputError
from rnngen.generate import StopScanner, filter_logits, pick_tokens
from rnngen.loaded import LoadedModel
from rnngen.model import RNNModel
from rnngen.tokenizers import CharTokenizer


@pytest.fixture
def generator(tmp_path: Path) -> LoadedModel:
    """A random model with sharp logits, saved and loaded like a real checkpoint."""
    tok = CharTokenizer.fit(["abcdefghijklmnopqrstuvwxyz .,\n"])
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=32, emb_dim=16, layers=2))
    with torch.no_grad():
        model.lm_head.proj.weight.mul_(8.0)  # spread the logits so near-ties are unlikely
    save_checkpoint(tmp_path / "ck", model, tok, {})
    return rnngen.load(str(tmp_path / "ck"))


def entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())


def test_low_temperature_equals_greedy(generator: LoadedModel) -> None:
    greedy = generator.sample("abc", length=200, greedy=True)
    assert generator.sample("abc", length=200, temperature=1e-4, seed=5) == greedy
    assert generator.sample("abc", length=200, top_k=1, seed=9) == greedy


def test_higher_temperature_higher_entropy(generator: LoadedModel) -> None:
    cold = generator.sample("a", length=3000, temperature=0.5, seed=1)
    hot = generator.sample("a", length=3000, temperature=1.5, seed=1)
    assert entropy(hot) > entropy(cold) + 0.1


def test_same_seed_same_text(generator: LoadedModel) -> None:
    a = generator.sample("the", length=300, seed=42)
    assert a == generator.sample("the", length=300, seed=42)
    assert a != generator.sample("the", length=300, seed=43)


def test_top_k_and_top_p_never_emit_excluded_tokens() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = lambda cfg: {int(pick_tokens(logits, cfg, gen)) for _ in range(3000)}  # noqa: E731
    assert draws(SampleConfig(temperature=5.0, top_k=3)) == {0, 1, 2}
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.23, 0.09, ...
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert draws(SampleConfig(temperature=1.0, top_p=0.8)) == {0, 1}
    assert draws(SampleConfig(temperature=1.0, top_p=0.5)) == {0}
    filtered = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isinf(filtered[0, 2:]).all() and torch.isfinite(filtered[0, :2]).all()


def test_top_k_respected_during_generation(generator: LoadedModel) -> None:
    """Replay the generation step by step and check every emitted token was in the top 2."""
    text = generator.sample("ab", length=100, top_k=2, temperature=3.0, seed=3)
    cursor = generator.start("ab")
    for ch in text:
        allowed = set(torch.topk(cursor.logits[0], 2).indices.tolist())
        token = int(generator.tokenizer.encode(ch)[0])
        assert token in allowed
        cursor = generator.feed([token], cursor.state)


def test_stop_strings(generator: LoadedModel) -> None:
    full = generator.sample("a", length=300, seed=7)
    stop = full[40:43]
    cut = generator.sample("a", length=300, seed=7, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_stop_scanner_holds_back_partial_matches() -> None:
    scanner = StopScanner(["\n\n", "END"])
    out = []
    for piece in ["Hello E", "N", "d. More\n", "x\n", "\nafter"]:
        text, stopped = scanner.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello ENd. More\nx"
    assert out[0] == "Hello "  # "E" might start "END": held back until resolved


def test_one_recurrent_step_per_new_token(generator: LoadedModel) -> None:
    generator.fast = False  # the plain path calls the model per token (test_fastpath.py checks the fast one)
    lengths: list[int] = []
    hook = generator.model.encoder.rnn.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    try:
        generator.sample("hello there", length=50, seed=0)
    finally:
        hook.remove()
    assert lengths[0] == len("hello there")  # the prompt is read once
    assert lengths[1:] == [1] * 50  # then one step per token, never re-reading the prefix


def test_prompt_of_unknown_characters_only(generator: LoadedModel) -> None:
    assert generator.unknown_characters("ab€") == 1
    generator.sample("ab€", length=5, seed=0)  # some unknown characters: fine
    with pytest.raises(InputError, match="no character this model knows"):
        generator.sample("€€", length=5)


def test_generate_yields_pieces(generator: LoadedModel) -> None:
    pieces = list(generator.generate("a", length=20, seed=1))
    assert len(pieces) == 20 and all(isinstance(p, str) for p in pieces)


def test_sample_config_rejects_bad_values() -> None:
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
                {"top_k": 0}, {"length": -1}):
        with pytest.raises(InputError):
            SampleConfig(**bad)


def test_a_long_prompt_is_read_in_windows_with_the_state_carried(generator: LoadedModel, monkeypatch) -> None:
    """feed reads FEED_WINDOW tokens per model call, reporting its progress after each: the same cursor as one
    call over the whole prompt."""
    ids = [int(i) for i in generator.tokenizer.encode("the cat sat on the mat. " * 20)]
    whole = generator.feed(ids)
    calls = []
    forward = generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda x, state=None: calls.append(x.size(1)) or forward(x, state))
    monkeypatch.setattr("rnngen.generate.FEED_WINDOW", 64)
    reported = []
    windowed = generator.feed(ids, progress=lambda done, total: reported.append((done, total)))
    assert calls == [64] * (len(ids) // 64) + [len(ids) % 64]
    assert reported == [(min(64 * (k + 1), len(ids)), len(ids)) for k in range(len(calls))]
    torch.testing.assert_close(windowed.logits, whole.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(windowed.state, whole.state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
