"""The fast generation path (rnngen.fastpath): the same numbers as the model, the same text as the plain path."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import rnngen
import rnngen.fastpath as fastpath
from rnngen.chat import ChatSession, Reply
from rnngen.checkpoint import save_checkpoint
from rnngen.config import ModelConfig, SampleConfig
from rnngen.errors import InputError
from rnngen.fastpath import Stepper, Streams
from rnngen.generate import pick_tokens
from rnngen.loaded import LoadedModel
from rnngen.model import RNNModel
from rnngen.tokenizers import CharTokenizer

from conftest import run_cli

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_model(arch: str = "lstm", layers: int = 2, tied: bool = False, vocab: int = 23, hidden: int = 16,
                 emb: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu") -> RNNModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, hidden=hidden, emb_dim=hidden if tied else emb, layers=layers,
                         arch=arch, tie_weights=tied)
    model = RNNModel(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()  # the bias starts at zero: make it count
    return model


def random_state(model: RNNModel, batch: int) -> tuple[torch.Tensor, ...]:
    """A state reached by reading random text (so it is not zero)."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, 7), device=model.lm_head.bias.device)
    with torch.no_grad():
        return model(tokens)[1]


def save_generator(tmp_path: Path, arch: str = "lstm", layers: int = 2, sharpen: float = 4.0,
                   hidden: int = 32, device: str = "cpu", chars: str = CHARS) -> LoadedModel:
    """A random model with sharpened logits (near-ties are rare), saved and loaded like a real checkpoint."""
    tok = CharTokenizer.fit([chars])
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=hidden, emb_dim=16, layers=layers, arch=arch))
    with torch.no_grad():
        model.lm_head.proj.weight.mul_(sharpen)  # type: ignore[union-attr]
    save_checkpoint(tmp_path / f"ck-{arch}-{layers}", model, tok, {})
    return rnngen.load(str(tmp_path / f"ck-{arch}-{layers}"), device=device)


@pytest.fixture
def gen(tmp_path: Path) -> LoadedModel:
    return save_generator(tmp_path)


def plain(gen: LoadedModel) -> LoadedModel:
    """The same loaded model, stepped the plain way (one model call per token)."""
    return LoadedModel(gen.model, gen.tokenizer, gen.config, gen.directory, fast=False)


# ------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("arch,layers,tied", list(itertools.product(["lstm", "gru", "rnn"], [1, 2, 3], [False, True])))
def test_step_equals_the_model(arch: str, layers: int, tied: bool) -> None:
    model = random_model(arch, layers, tied)
    stepper = Stepper(model)
    for state in (None, random_state(model, 3)):
        tokens = torch.tensor([0, 5, 22])
        logits, new_state = stepper.step(tokens, state)
        with torch.no_grad():
            expected, expected_state = model(tokens.view(3, 1), state)
        assert logits.shape == (3, 23)
        torch.testing.assert_close(logits, expected[:, -1], rtol=1e-5, atol=1e-5)
        assert len(new_state) == len(expected_state)
        for got, want in zip(new_state, expected_state):
            assert got.shape == want.shape == (layers, 3, 16)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_state_carried_over_many_steps_stays_equal(arch: str) -> None:
    model = random_model(arch, layers=2, hidden=32)
    streams = Stepper(model).streams(None, 2)
    state = None
    for _ in range(300):
        tokens = torch.randint(0, 23, (2,))
        logits = streams.advance(tokens)
        with torch.no_grad():
            expected, state = model(tokens.view(2, 1), state)
        torch.testing.assert_close(logits, expected[:, -1], rtol=1e-4, atol=1e-4)
    for got, want in zip(streams.state(), state):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_state_handed_out_is_never_changed() -> None:
    model = random_model()
    streams = Stepper(model).streams(None, 1)
    streams.advance(torch.tensor([1]))
    before = streams.state()
    copy = tuple(s.clone() for s in before)
    for token in range(5):
        streams.advance(torch.tensor([token]))
    assert all(torch.equal(a, b) for a, b in zip(before, copy))


def test_large_vocabulary_reads_embedding_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past TABLE_MAX_ELEMENTS the layer-0 table is not built: the embedding row is multiplied instead."""
    monkeypatch.setattr(fastpath, "TABLE_MAX_ELEMENTS", 0)
    for arch in ("lstm", "gru", "rnn"):
        model = random_model(arch)
        stepper = Stepper(model)
        assert stepper.w_ih0 is not None and stepper.table.shape == (23, 8)  # the embedding itself
        state = random_state(model, 2)
        logits, _ = stepper.step(torch.tensor([3, 4]), state)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(torch.tensor([[3], [4]]), state)[0][:, -1])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.bfloat16, 5e-2)])
def test_other_dtypes(dtype: torch.dtype, tolerance: float) -> None:
    model = random_model("lstm", 2, dtype=dtype)
    state = random_state(model, 2)
    logits, new_state = Stepper(model).step(torch.tensor([1, 2]), state)
    with torch.no_grad():
        expected, expected_state = model(torch.tensor([[1], [2]]), state)
    assert logits.dtype == new_state[0].dtype == dtype
    torch.testing.assert_close(logits, expected[:, -1], rtol=tolerance, atol=tolerance)


def test_bidirectional_is_refused() -> None:
    model = RNNModel(ModelConfig(vocab_size=10, hidden=8, emb_dim=4, layers=1, bidirectional=True))
    with pytest.raises(InputError, match="bidirectional"):
        Stepper(model)


def test_threads_are_restored() -> None:
    threads = torch.get_num_threads()
    streams = Stepper(random_model()).streams(None, 1)
    assert streams.single_thread
    torch.set_num_threads(2)
    try:
        streams.advance(torch.tensor([1]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_pick_tokens_draws_what_multinomial_draws() -> None:
    """pick_tokens replaces torch.multinomial by its own algorithm: same generator, same tokens."""
    config = SampleConfig(temperature=1.0)
    for seed, (batch, vocab) in enumerate(itertools.product([1, 5], [3, 65, 2000])):
        logits = torch.randn(batch, vocab) * 3
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(20):
            expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=theirs).squeeze(-1)
            assert torch.equal(pick_tokens(logits, config, ours), expected)


def test_pick_tokens_with_gumbel_noise_drawn_in_advance() -> None:
    """CUDA graphs pass Gumbel noise, -log(q): the same choice as drawing q in place, filters included."""
    logits = torch.randn(64, 30) * 2
    for options in ({}, {"top_k": 3}, {"top_p": 0.7}, {"temperature": 0.5, "top_k": 5, "top_p": 0.9}):
        config = SampleConfig(**options)
        now, ahead = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        gumbel = -torch.empty(64, 30).exponential_(generator=ahead).log()
        assert torch.equal(pick_tokens(logits, config, now), pick_tokens(logits, config, None, gumbel)), options


# ------------------------------------------------------------------------------------------- the text
@pytest.mark.parametrize("arch,length,native", [("lstm", 2500, True), ("lstm", 2500, False), ("gru", 600, False),
                                                ("rnn", 600, False)])
def test_same_seed_same_text_as_the_plain_path(tmp_path: Path, arch: str, length: int, native: bool) -> None:
    """The torch step, and for LSTMs the compiled CPU step (rnngen.cpu_step), against one model call per token."""
    gen = save_generator(tmp_path, arch, sharpen=1.5)  # a soft distribution: many different characters
    gen.use_native = native
    options = {"length": length, "temperature": 1.0, "seed": 11}
    text = gen.sample("the ", **options)
    assert len(text) == length and len(set(text)) > 15
    assert text == plain(gen).sample("the ", **options)
    assert (gen._native is not None) == native and gen.native_error is None


def test_greedy_top_k_top_p_equal_the_plain_path(gen: LoadedModel) -> None:
    for options in ({"greedy": True}, {"top_k": 3, "seed": 2}, {"top_p": 0.8, "seed": 3, "temperature": 1.3}):
        assert gen.sample("a", length=400, **options) == plain(gen).sample("a", length=400, **options), options


def test_stop_strings_on_the_fast_path(gen: LoadedModel) -> None:
    full = gen.sample("a", length=300, seed=7, temperature=1.0)
    stop = full[100:102]
    assert gen.sample("a", length=300, seed=7, temperature=1.0, stop=[stop]) == full[: full.index(stop)]


def test_cursor_follows_the_text(gen: LoadedModel) -> None:
    """After continue_from the cursor is where reading prompt + text in one call leads."""
    cursor = gen.start("ab")
    text = "".join(gen.continue_from(cursor, SampleConfig(length=50, seed=1)))
    whole = gen.feed([int(i) for i in gen.tokenizer.encode("ab" + text)])
    torch.testing.assert_close(cursor.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(cursor.state, whole.state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_fast_step_per_new_token(gen: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    gen.use_native = False  # the torch step (the compiled one steps in blocks: tests/test_cpu_step.py)
    model_calls: list[int] = []
    steps: list[int] = []
    advance = Streams.advance
    monkeypatch.setattr(Streams, "advance", lambda self, tokens: steps.append(len(tokens)) or advance(self, tokens))
    hook = gen.model.encoder.rnn.register_forward_hook(lambda m, inp, out: model_calls.append(inp[0].shape[1]))
    try:
        gen.sample("hello there", length=50, seed=0)
    finally:
        hook.remove()
    assert model_calls == [len("hello there")]  # the prompt is read once, by the model
    assert steps == [1] * 50  # then one step per token


def test_chat_on_the_fast_path_equals_the_plain_path(gen: LoadedModel) -> None:
    config = SampleConfig(length=40, stop=("\n\n",), seed=4, temperature=1.0)
    replies = []
    for g in (gen, plain(gen)):
        session = ChatSession(g, config, user_prefix="a:", bot_prefix="b:")
        replies.append(["".join(e.text for e in session.handle(line) if isinstance(e, Reply))
                        for line in ("hello there", "and again", "/undo", "and again")])
    assert replies[0] == replies[1] and any(replies[0])


# ------------------------------------------------------------------------------------------- batches
def test_batch_greedy_streams_each_equal_the_single_text(gen: LoadedModel) -> None:
    single = gen.sample("ab", length=200, greedy=True)
    assert gen.sample_many(5, "ab", length=200, greedy=True) == [single] * 5


def test_batch_with_a_seed_is_reproducible_and_the_streams_differ(gen: LoadedModel) -> None:
    texts = gen.sample_many(6, "ab", length=100, seed=3, temperature=1.0)
    assert texts == gen.sample_many(6, "ab", length=100, seed=3, temperature=1.0)
    assert len(set(texts)) == 6 and all(len(t) == 100 for t in texts)
    assert texts == plain(gen).sample_many(6, "ab", length=100, seed=3, temperature=1.0)  # same draws


def test_each_stream_of_a_batch_stops_on_its_own(gen: LoadedModel) -> None:
    full = gen.sample_many(8, "a", length=150, seed=5, temperature=1.0)
    # a stop string that some streams reach (at different places) and some never do
    stop = max((full[0][i:i + 2] for i in range(20, 140)), key=lambda s: 0 < sum(s in t for t in full) < 8)
    assert 0 < sum(stop in t for t in full) < 8
    cut = gen.sample_many(8, "a", length=150, seed=5, temperature=1.0, stop=[stop])
    for whole, part in zip(full, cut):
        assert part == (whole[: whole.index(stop)] if stop in whole else whole)


def test_batch_of_zero_is_refused(gen: LoadedModel) -> None:
    with pytest.raises(InputError, match="at least 1"):
        gen.sample_many(0, "a")


def test_cli_num_samples(tmp_path: Path) -> None:
    save_generator(tmp_path)
    ck = str(tmp_path / "ck-lstm-2")
    proc = run_cli("sample", ck, "-p", "ab", "-n", "40", "--num-samples", "3", "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    samples = json.loads(proc.stdout)
    assert [s["temperature"] for s in samples] == [0.8] * 3 and all(s["text"].startswith("ab") for s in samples)
    assert len({s["text"] for s in samples}) == 3
    proc = run_cli("sample", ck, "-p", "ab", "-n", "40", "--num-samples", "3", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    # the same samples, one after another, a blank line apart; a header for each on stderr
    assert proc.stdout == "\n".join(s["text"] + "\n" for s in samples)
    assert [line.count("sample") for line in proc.stderr.splitlines()] == [1, 1, 1]
    assert "sample 3/3" in proc.stderr
    greedy = run_cli("sample", ck, "-p", "ab", "-n", "40", "--greedy").stdout
    proc = run_cli("sample", ck, "-p", "ab", "-n", "40", "--greedy", "--num-samples", "2", "--json")
    assert [s["text"] + "\n" for s in json.loads(proc.stdout)] == [greedy, greedy]
    proc = run_cli("sample", ck, "--num-samples", "0")
    assert proc.returncode == 2 and "--num-samples" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_cuda_step_equals_the_model(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's default TF32 rounds to 1e-3
    model = random_model(arch, layers=3, device="cuda")
    state = random_state(model, 4)
    tokens = torch.tensor([0, 1, 2, 3], device="cuda")
    logits, new_state = Stepper(model).step(tokens, state)
    with torch.no_grad():
        expected, expected_state = model(tokens.view(4, 1), state)
    torch.testing.assert_close(logits, expected[:, -1], rtol=1e-4, atol=1e-4)
    for got, want in zip(new_state, expected_state):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_cuda_graph_greedy_text_and_cursor_equal_the_plain_path(tmp_path: Path, arch: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the plain path in fp32, as the Triton step
    gen = save_generator(tmp_path, arch, layers=3, hidden=64, device="cuda")
    length = 3 * 32 + 5  # whole blocks and a part of one
    for prompt in ("ab", "the end", "x"):  # the second and third reuse the captured graph
        cursors, texts = [], []
        for g in (gen, plain(gen)):
            cursor = g.start(prompt)
            texts.append("".join(g.continue_from(cursor, SampleConfig(greedy=True, length=length))))
            cursors.append(cursor)
        assert gen.graph_error is None and gen.triton_error is None, (gen.graph_error, gen.triton_error)
        assert texts[0] == texts[1] and len(texts[0]) == length
        torch.testing.assert_close(cursors[0].logits, cursors[1].logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(cursors[0].state, cursors[1].state):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(gen._graphs) == 1


@cuda
def test_cuda_graph_sampling_seed_stop_and_batches(tmp_path: Path) -> None:
    gen = save_generator(tmp_path, "lstm", layers=2, hidden=64, device="cuda")
    options = {"length": 200, "temperature": 1.0, "seed": 5}
    full = gen.sample("a", **options)
    assert full == gen.sample("a", **options) and len(set(full)) > 10  # reproducible, and really sampled
    stop = full[120:122]
    assert gen.sample("a", stop=[stop], **options) == full[: full.index(stop)]
    for top in ({"top_k": 2}, {"top_p": 0.5}):  # every token was among the allowed ones: replay with the model
        text = gen.sample("ab", length=100, seed=1, **top)
        cursor = gen.start("ab")
        for ch in text:
            allowed = torch.softmax(cursor.logits[0].float() / 0.8, -1).sort(descending=True)  # temperature 0.8
            token = int(gen.tokenizer.encode(ch)[0])
            rank = int((allowed.indices == token).nonzero())
            assert rank < 2 if "top_k" in top else float(allowed.values[:rank].sum()) < 0.5
            cursor = gen.feed([token], cursor.state)
    greedy = gen.sample("ab", length=100, greedy=True)
    assert gen.sample_many(16, "ab", length=100, greedy=True) == [greedy] * 16
    many = gen.sample_many(16, "ab", **{**options, "seed": 2})
    assert len(set(many)) == 16 and many == gen.sample_many(16, "ab", **{**options, "seed": 2})
    assert gen.graph_error is None, gen.graph_error


@cuda
def test_cuda_falls_back_to_eager_steps_when_capture_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rnngen.generate

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("capture failed")

    monkeypatch.setattr(rnngen.generate, "GraphSampler", broken)
    gen = save_generator(tmp_path, "gru", layers=2, hidden=64, device="cuda")
    text = gen.sample("ab", length=80, greedy=True)
    assert isinstance(gen.graph_error, RuntimeError)  # kept, and not tried again
    assert text == plain(gen).sample("ab", length=80, greedy=True)
    assert gen.sample_many(3, "ab", length=80, greedy=True) == [text] * 3


# ------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.parametrize("layers, hidden, vocab", [(1, 18, 7), (3, 40, 23), (2, 130, 65)])
def test_triton_step_equals_the_stepper(layers: int, hidden: int, vocab: int) -> None:
    """The kernels' arithmetic, on the GPU or else in Triton's interpreter (conftest), in two tilings: several
    layers; with 4 units per program, units that do not fill a program (18 = 4 x 4 + 2) and inputs longer
    than one 256-wide pass of the inner loop (2 x 130)."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extras install it on Linux x86-64)")
    from rnngen.triton_step import TritonLSTM, triton_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model("lstm", layers=layers, hidden=hidden, vocab=vocab, device=device)
    stepper = Stepper(model)
    step = triton_step(stepper)
    assert step is not None
    # the default tiling (one unit per program, each row in one pass), and 4 units with 256-wide passes
    for step in (step, TritonLSTM(stepper, units=4, block_k=256, block_v=32).step):
        state = expected_state = random_state(model, 1)
        for token in (3, 0, vocab - 1):
            tokens = torch.tensor([token], device=device)
            logits, state = step(tokens, state)
            expected, expected_state = stepper.step(tokens, expected_state)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            for got, want in zip(state, expected_state):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert triton_step(Stepper(random_model("gru"))) is None  # LSTMs only
    assert triton_step(Stepper(random_model("lstm", dtype=torch.bfloat16))) is None  # fp32 only


@cuda
def test_cuda_triton_graph_samples_what_the_cudnn_graph_samples(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 of an LSTM steps through Triton kernels in the graph: same seed, same text as the model's own
    step in the graph (the same distribution, to float rounding), and a broken Triton step falls back to it."""
    pytest.importorskip("triton")
    import rnngen.triton_step

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gen = save_generator(tmp_path, "lstm", layers=3, hidden=128, device="cuda")
    cudnn = rnngen.load(str(gen.directory), device="cuda")
    cudnn.use_triton = False
    for options in ({"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_k": 5, "seed": 4}):
        text = gen.sample("ab", length=300, **options)
        assert text == cudnn.sample("ab", length=300, **options) and len(set(text)) >= 4  # top-k 5: 5 at most
    assert gen.triton_error is None and gen.graph_error is None
    assert {type(s.step.__self__).__name__ for s in gen._graphs.values()} == {"TritonLSTM"}

    def broken(self: object, tokens: torch.Tensor, state: object) -> None:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(rnngen.triton_step.TritonLSTM, "step", broken)
    fallback = rnngen.load(str(gen.directory), device="cuda")
    assert fallback.sample("ab", length=300, temperature=1.0, seed=3) == gen.sample("ab", length=300,
                                                                                    temperature=1.0, seed=3)
    assert isinstance(fallback.triton_error, RuntimeError) and fallback.graph_error is None
