"""The compiled CPU sampler (rnngen.cpu_step): the plain path's text, any thread count, and its fall-backs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rnngen.config import SampleConfig
from rnngen.cpu_step import NativeRNN, NativeUnavailable, library
from rnngen.generate import BLOCK

from conftest import run_cli
from test_fastpath import plain, save_generator

needs_compiler = pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))),
                                    reason="needs a C compiler (the compiled step is built on first use)")


@needs_compiler
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers,hidden", [(1, 32), (2, 40), (3, 100)])
def test_same_seed_same_text_as_the_plain_path(tmp_path: Path, arch: str, layers: int, hidden: int) -> None:
    """Hidden sizes that are not a multiple of the C code's 32-unit blocks are padded with zero weights."""
    gen = save_generator(tmp_path, arch=arch, layers=layers, hidden=hidden, sharpen=1.5)
    for options in ({"temperature": 1.0, "seed": 5}, {"temperature": 0.6, "seed": 6}, {"greedy": True},
                    {"temperature": 1.0, "top_k": 5, "seed": 7}, {"temperature": 1.2, "top_p": 0.8, "seed": 8},
                    {"temperature": 0.9, "top_k": 12, "top_p": 0.95, "seed": 9}):
        text = gen.sample("the ", length=1500, **options)
        assert text == plain(gen).sample("the ", length=1500, **options), options
    assert gen.native_error is None and gen._native is not None
    assert len(set(gen.sample("the ", length=1500, temperature=1.0, seed=5))) > 15


@needs_compiler
def test_top_k_and_top_p_over_a_large_vocabulary(tmp_path: Path) -> None:
    """The C code's quickselect (top-k) and sort (top-p) pick what filter_logits keeps, over 600 tokens."""
    gen = save_generator(tmp_path, chars="".join(map(chr, range(0x400, 0x400 + 600))), sharpen=1.0)
    for options in ({"top_k": 40, "seed": 1}, {"top_k": 599, "seed": 2}, {"top_p": 0.5, "seed": 3},
                    {"top_k": 100, "top_p": 0.7, "seed": 4}, {"top_k": 1, "seed": 5}):
        text = gen.sample(length=300, temperature=1.0, **options)
        assert text == plain(gen).sample(length=300, temperature=1.0, **options), options
    assert gen._native is not None and len(set(gen.sample(length=300, temperature=1.0, top_k=40, seed=1))) > 30


@needs_compiler
def test_steps_in_blocks_with_no_torch_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = save_generator(tmp_path)
    calls: list[int] = []
    sample = NativeRNN.sample
    monkeypatch.setattr(NativeRNN, "sample", lambda self, *a: calls.append(a[5]) or sample(self, *a))
    monkeypatch.setattr("rnngen.fastpath.Streams.advance", lambda *a: pytest.fail("the torch step was used"))
    assert len(gen.sample("ab", length=3 * BLOCK + 5, seed=1)) == 3 * BLOCK + 5
    assert calls == [BLOCK] * 3 + [5]  # the last block stops at the length asked for
    assert len(gen.sample("ab", length=2 * BLOCK, seed=1, top_k=3, top_p=0.9)) == 2 * BLOCK  # filtered in C too


@needs_compiler
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_thread_count_does_not_change_a_number(tmp_path: Path, arch: str) -> None:
    """Each output is summed by one thread in one order, however the blocks are shared out."""
    gen = save_generator(tmp_path, arch=arch, layers=2, hidden=128)
    net = NativeRNN(gen.stepper())
    results = []
    for threads in (1, 2, 3):
        net.threads = threads
        h, c = torch.randn(2, net.padded, generator=torch.Generator().manual_seed(0)), torch.zeros(2, net.padded)
        logits = torch.randn(net.vocab_size, generator=torch.Generator().manual_seed(2))
        noise = torch.empty(200, net.vocab_size).exponential_(generator=torch.Generator().manual_seed(1))
        tokens, states, all_logits = net.sample(h, c, logits, noise, 1.0, 200, True)
        results.append((tokens, *states, all_logits, h, c))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_compiler
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_cursor_state_after_a_stop_inside_a_block(tmp_path: Path, arch: str) -> None:
    """A stop string ends the text mid-block: the cursor is where reading the text in one call leads."""
    gen = save_generator(tmp_path, arch=arch, sharpen=1.5)
    full = gen.sample("a", length=200, seed=7, temperature=1.0)
    stop = full[50:52]
    cursor = gen.start("a")
    text = "".join(gen.continue_from(cursor, SampleConfig(length=200, seed=7, temperature=1.0, stop=(stop,))))
    assert text == full[: full.index(stop)]
    whole = gen.feed([int(i) for i in gen.tokenizer.encode("a" + full[: full.index(stop) + len(stop)])])
    torch.testing.assert_close(cursor.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(cursor.state, whole.state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_block_noise_is_the_noise_of_one_draw_per_step() -> None:
    """The sampler draws a block's Exp(1) noise at once; torch gives the values of one draw per step."""
    for vocab, steps in ((65, 32), (8000, 7)):
        per_step, ahead = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        drawn = torch.cat([torch.empty(1, vocab).exponential_(generator=per_step) for _ in range(steps)])
        assert torch.equal(drawn, torch.empty(steps, vocab).exponential_(generator=ahead))


def test_what_it_does_not_cover_uses_the_torch_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NativeRNN, "sample", lambda *a: pytest.fail("the compiled step was used"))
    gen = save_generator(tmp_path, sharpen=1.5)
    assert gen.sample_many(3, "a", length=100, seed=1) == plain(gen).sample_many(3, "a", length=100, seed=1)
    monkeypatch.setattr("rnngen.fastpath.TABLE_MAX_ELEMENTS", 0)  # a vocabulary too large for the input table
    large = save_generator(tmp_path, arch="rnn")
    assert large.sample("a", length=100, seed=1) == plain(large).sample("a", length=100, seed=1)
    assert isinstance(large.native_error, NativeUnavailable) and "input table" in str(large.native_error)


@needs_compiler
def test_without_a_compiler_the_cli_samples_the_same_text(tmp_path: Path) -> None:
    """No compiler (CC=false, an empty cache) or RNNGEN_NATIVE=0: the torch step, the same text."""
    library()  # built in this session's cache
    gen = save_generator(tmp_path, sharpen=1.5)
    args = ("sample", str(gen.directory), "--length", "300", "--seed", "4", "--temperature", "1.0")
    native = run_cli(*args)
    assert native.returncode == 0, native.stderr
    for env in ({"CC": "false", "RNNGEN_CACHE_DIR": str(tmp_path / "empty-cache")}, {"RNNGEN_NATIVE": "0"}):
        fallback = run_cli(*args, env=env)
        assert fallback.returncode == 0 and fallback.stdout == native.stdout, (env, fallback.stderr)
    assert list((tmp_path / "empty-cache").glob("native/*.so")) == []
