"""The sampling engine: text pieces from a model and its tokenizer, one recurrent step per new token (the
state is carried). ``Sampler`` knows nothing of checkpoints: ``rnngen.load`` returns a ``LoadedModel``
(loaded.py), a Sampler that also knows its checkpoint, classifies, evaluates and chats."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import SampleConfig
from .cpu_step import NativeRNN, NativeSampler, NativeUnavailable
from .errors import InputError
from .fastpath import GraphSampler, Stepper
from .model import RNNModel, State
from .tokenizers import Tokenizer

BLOCK = 32  # tokens per CUDA-graph replay or call of the compiled CPU step (shorter runs step eagerly)
FEED_WINDOW = 4096  # tokens of a prompt read per model call
GRAPH_CACHE = 8  # captured graphs kept per Sampler (one per batch size and sampling settings)
FAST_DEVICES = ("cpu", "cuda")  # where the fast steps are used (elsewhere the model is called per token)


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


def pick_tokens(logits: torch.Tensor, config: SampleConfig, generator: torch.Generator | None,
                gumbel: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    ``gumbel`` (B, V), Gumbel noise drawn in advance (-log of Exp(1) draws; for CUDA graphs), replaces
    drawing from ``generator``: argmax(logits / T + G) is the same choice as argmax(p / q) below, in log space.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    if gumbel is not None:
        if config.top_k is None and config.top_p is None:  # argmax(l + T * G) = argmax(l / T + G): one kernel
            return torch.add(logits.float(), gumbel, alpha=config.temperature).argmax(dim=-1)
        return (filter_logits(logits.float() / config.temperature, config.top_k, config.top_p) + gumbel).argmax(-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Exactly the draw torch.multinomial(probs, 1) makes (the argmax of p / q with q ~ Exp(1), from the same
    # generator), without its validity checks, which cost more than the rest of a small model's step.
    return probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)


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


class TextStream:
    """Token ids in, text out: decoding, then stop strings (the text safe to show, and whether one was hit)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.scanner = StopScanner(stops)

    def push(self, token: int) -> tuple[str, bool]:
        return self.scanner.push(self.decoder.feed(token))

    def finish(self) -> str:
        """The text still held back, once no token follows."""
        flush = getattr(self.decoder, "flush", None)
        text, _ = self.scanner.push(flush() if flush else "")
        return text + self.scanner.flush()


def random_stream(seed: int | None, device: torch.device) -> torch.Generator:
    """A torch random-number generator seeded with ``seed`` (from the OS when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


@dataclass
class Cursor:
    """Where a text stream stands: the recurrent state and the logits for the next token.

    A cursor started for a label with ``guidance`` g != 1 also carries ``free``, the same text read
    without the label; each next token is then drawn from the label's log-probabilities pushed away
    from the unlabelled ones: log p(x | label) + (g - 1) * (log p(x | label) - log p(x))
    (classifier-free guidance, Ho & Salimans 2022; Sanchez et al. 2023 for language models).
    """

    state: State | None
    logits: torch.Tensor  # (1, V)
    free: Cursor | None = None
    guidance: float = 1.0

    def copy(self) -> Cursor:
        """A cursor at the same place that advances independently (states are replaced, never modified)."""
        free = self.free.copy() if self.free is not None else None
        return Cursor(self.state, self.logits, free, self.guidance)


def guided_logits(logits: torch.Tensor, free: torch.Tensor, guidance: float) -> torch.Tensor:
    """Log-probabilities for classifier-free guidance (see ``Cursor``); tokens the label excludes stay excluded."""
    cond, uncond = torch.log_softmax(logits.float(), -1), torch.log_softmax(free.float(), -1)
    mixed = cond + (guidance - 1.0) * (cond - uncond)
    return mixed.masked_fill(torch.isneginf(cond) | mixed.isnan(), float("-inf"))


class Sampler:
    """A model and its tokenizer, ready to generate text: cursors (``start``, ``feed``) and what follows them.

    ``fast`` steps with rnngen.fastpath (the same numbers at a fraction of the overhead: compiled C on the CPU,
    CUDA graphs and Triton on CUDA); False calls the model itself for each token (the plain path, kept for
    comparison and for a model whose weights are still changing, as in training).
    """

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, fast: bool = True) -> None:
        self.model, self.tokenizer, self.fast = model, tokenizer, fast
        self.device = next(model.parameters()).device
        self._stepper: Stepper | None = None
        self.graph_error: Exception | None = None  # why a CUDA graph could not be captured, if it ever failed
        self.use_triton = True  # CUDA, one stream of an fp32 LSTM: step in Triton kernels (see triton_step)
        self.triton_error: Exception | None = None  # why the Triton step failed, if it ever did
        self._triton_step: Callable[..., Any] | bool | None = None  # built on first use; False: not for this model
        self._graphs: dict[tuple[Any, ...], GraphSampler] = {}  # captured CUDA graphs, by sampling settings
        self.use_native = True  # CPU, one stream of an fp32 model: sample in compiled C (see cpu_step)
        self.native_error: Exception | None = None  # why the compiled step cannot be used, if it cannot
        self._native: NativeRNN | None = None  # built on first use
        # Label tokens only ever begin a text: they are never generated (the model's weights stay as trained).
        self._text_vocab = model.config.text_vocab_size if model.config.label_tokens else None

    def _text_only(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the label tokens' set to -inf (in place: they are fresh from the model)."""
        if self._text_vocab is not None:
            logits[..., self._text_vocab:] = float("-inf")
        return logits

    def _check_generative(self) -> None:
        if self.model.config.bidirectional:
            raise InputError("this checkpoint has a bidirectional encoder, which can classify but not "
                             "generate; use a unidirectional model for text generation")

    @property
    def labels(self) -> list[str]:
        """Labels this model can generate for (``--label``); empty for a plain language model."""
        return list(self.model.config.label_tokens)

    def stepper(self) -> Stepper:
        """The model's weights prepared for one-token steps (built on first use; the weights must not change)."""
        if self._stepper is None:
            self._stepper = Stepper(self.model)
        return self._stepper

    def unknown_characters(self, text: str) -> int:
        """How many characters of ``text`` the tokenizer cannot represent (they become <unk>)."""
        return self.tokenizer.count_unknown(text)

    def _prompt_ids(self, prompt: str, label: str | None = None) -> list[int]:
        self._check_generative()
        if label is not None:
            if not self.labels:
                raise InputError("this model has no labels to generate for (it was not trained on labelled "
                                 "data); drop --label, or train one with `rnngen classify train`")
            if label not in self.labels:
                raise InputError(f"unknown label {label!r}; this model's labels are: {', '.join(self.labels)}")
            return [self.model.config.label_id(label)] + ([int(i) for i in self.tokenizer.encode(prompt)]
                                                          if prompt else [])
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
    def feed(self, ids: Sequence[int], state: State | None = None,
             progress: Callable[[int, int], None] | None = None) -> Cursor:
        """Read ``ids`` from ``state`` (in windows of FEED_WINDOW tokens, the state carried: a long prompt never
        holds the logits of every position at once); the cursor is ready to predict what follows.
        ``progress(done, total)`` is called after each window."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        total = x.size(1)
        for start in range(0, total, FEED_WINDOW):
            logits, state = self.model(x[:, start:start + FEED_WINDOW], state)
            if progress is not None:
                progress(min(start + FEED_WINDOW, total), total)
        return Cursor(state, self._text_only(logits[:, -1]))

    def start(self, prompt: str = "", label: str | None = None, guidance: float = 1.0,
              progress: Callable[[int, int], None] | None = None) -> Cursor:
        """A cursor after ``prompt`` (after the label's token first, when ``label`` is given).

        ``guidance`` > 1 strengthens the label (see ``Cursor``): the text is also read from where an
        unlabelled example begins, which models trained with ``--label-dropout`` know. ``progress``: see ``feed``.
        """
        ids, free_ids = self.start_ids(prompt, label, guidance)
        cursor = self.feed(ids, progress=progress)
        if free_ids is not None:
            cursor.free, cursor.guidance = self.feed(free_ids), guidance
        return cursor

    def start_ids(self, prompt: str = "", label: str | None = None,
                  guidance: float = 1.0) -> tuple[list[int], list[int] | None]:
        """The token ids ``start`` reads (checked as it checks them): the text's, after the label's token when
        there is a label; and with guidance != 1 the unlabelled text's as well (else None)."""
        if not (math.isfinite(guidance) and guidance >= 0):
            raise InputError(f"guidance must be a number >= 0 (1 is plain sampling), got {guidance}")
        ids = self._prompt_ids(prompt, label)
        if guidance == 1.0:
            return ids, None
        if label is None:
            raise InputError("guidance strengthens a label: give --label too")
        # Unlabelled, a text starts where a paragraph does (as in training): after a newline.
        prompt_ids = [int(i) for i in self.tokenizer.encode(prompt)] if prompt else []
        return ids, self._prompt_ids("") + prompt_ids

    def continue_from(self, cursor: Cursor, config: SampleConfig,
                      generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield text pieces after ``cursor`` (advancing it) until ``config.length`` tokens or a stop string."""
        # Not decorated with inference_mode, which costs 7 us a token (of ~110 on CPU) as it wraps every
        # resumption of a generator: _steps enters it around each step's work instead.
        generator = generator or random_stream(config.seed, self.device)
        text = TextStream(self.tokenizer, config.stop)
        for (token,) in self._steps(cursor, 1, config, generator, track=True):
            piece, stopped = text.push(token)
            if piece:
                yield piece
            if stopped:
                return
        if rest := text.finish():
            yield rest

    @torch.inference_mode()
    def continue_many(self, cursor: Cursor, n: int, config: SampleConfig,
                      generator: torch.Generator | None = None) -> list[str]:
        """``n`` independent continuations of ``cursor`` (which is left as it is), sampled together as one batch.

        Each ends at its own stop string or after ``config.length`` tokens. With ``greedy`` every one is the
        text ``continue_from`` gives; with a seed the batch is reproducible (its draws differ from n
        separate calls').
        """
        if n < 1:
            raise InputError(f"the number of samples must be at least 1, got {n}")
        generator = generator or random_stream(config.seed, self.device)
        texts = [TextStream(self.tokenizer, config.stop) for _ in range(n)]
        pieces: list[list[str]] = [[] for _ in range(n)]
        running = list(range(n))  # the streams that have not reached a stop string
        for ids in self._steps(cursor, n, config, generator, track=False):
            still = []
            for i in running:
                piece, stopped = texts[i].push(ids[i])
                pieces[i].append(piece)
                if not stopped:
                    still.append(i)
            running = still
            if not running:
                break
        for i in running:
            pieces[i].append(texts[i].finish())
        return ["".join(p) for p in pieces]

    def _steps(self, cursor: Cursor, n: int, config: SampleConfig, generator: torch.Generator,
               track: bool) -> Iterator[list[int]]:
        """Sample up to ``config.length`` tokens for ``n`` streams starting at ``cursor``; yield each step's ids.

        With ``track`` (n == 1) the cursor is moved past each token before its id is yielded, so it is whole
        whenever the caller has control. On CUDA, long runs go through a CUDA graph, in blocks of tokens.
        """
        free = cursor.free  # guided sampling: n more streams read the same tokens without the label
        state, logits = self._expanded(cursor, n)
        if free is not None:
            free_state, free_logits = self._expanded(free, n)
            state = tuple(torch.cat(pair, dim=1) for pair in zip(state, free_state))
            logits = torch.cat([logits, free_logits])
        key = (n, config.greedy, config.temperature, config.top_k, config.top_p, track)
        long_run = config.length > BLOCK and free is None
        sampler = self._block_sampler(key, state, logits) if long_run else None
        if sampler is not None:
            try:
                for block_ids, states, all_logits in sampler.blocks(generator, config.length):
                    if track:  # views of each position, made in a few calls (indexing each costs a microsecond)
                        per_position = (*(s.unbind(0) for s in states), all_logits.unbind(0))  # type: ignore
                        positions = list(zip(*per_position))
                    for k in range(len(block_ids)):
                        if track:
                            *cursor_state, cursor.logits = positions[k]
                            cursor.state = tuple(cursor_state)
                        yield block_ids[k]
            finally:  # back in the cache (taken out while in use: an interleaved run captures its own)
                if isinstance(sampler, GraphSampler):
                    self._graphs[key] = sampler
                    while len(self._graphs) > GRAPH_CACHE:
                        del self._graphs[next(iter(self._graphs))]
            return
        fast = self.fast and self.device.type in FAST_DEVICES
        with torch.inference_mode():
            streams = self.stepper().streams(state, len(logits)) if fast else None
        for _ in range(config.length):
            with torch.inference_mode():  # for each step's work alone: never while the caller has control
                scores = logits if free is None else guided_logits(logits[:n], logits[n:], cursor.guidance)
                tokens = pick_tokens(scores, config, generator)  # (n,)
                fed = tokens if free is None else tokens.repeat(2)
                if streams is None:
                    logits, state = self.model_step(fed, state)
                else:
                    logits = streams.advance(fed)
                    state = streams.state() if track else state
                ids: list[int] = tokens.tolist()
            if track and free is not None:
                cursor.state, cursor.logits = tuple(s[:, :1] for s in state), logits[:1]
                free.state, free.logits = tuple(s[:, 1:] for s in state), logits[1:]
            elif track:
                cursor.state, cursor.logits = state, logits
            yield ids

    def _expanded(self, cursor: Cursor, n: int) -> tuple[State, torch.Tensor]:
        """The cursor's state and logits repeated for ``n`` streams."""
        state = cursor.state or self.model.encoder.initial_state(1, self.device)
        if n > 1:
            state = tuple(s.expand(-1, n, -1).contiguous() for s in state)
        return state, cursor.logits.expand(n, -1)

    def model_step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The plain step: one model call for one token per stream; logits (B, V), label tokens masked, and the
        new state."""
        out, state = self.model(tokens.view(-1, 1), state)
        return self._text_only(out[:, -1]), state

    def _native_sampler(self, key: tuple[Any, ...], state: State, logits: torch.Tensor) -> NativeSampler | None:
        """The compiled CPU sampler for one stream of an fp32 model; None where it cannot run (the
        reason is kept in ``native_error``; the torch steps are used instead)."""
        n, greedy, temperature, top_k, top_p, track = key
        if not (self.use_native and n == 1 and self.native_error is None):
            return None
        if self._native is None:
            try:
                self._native = NativeRNN(self.stepper())
            except NativeUnavailable as exc:
                self.native_error = exc
                return None
        return NativeSampler(self._native, state, logits, None if greedy else temperature, track, BLOCK, top_k, top_p)

    def _block_sampler(self, key: tuple[Any, ...], state: State,
                       logits: torch.Tensor) -> GraphSampler | NativeSampler | None:
        """A sampler of blocks of tokens for ``key`` (n, greedy, temperature, top_k, top_p, track) starting at
        ``state`` and ``logits``: on the CPU the compiled step where it applies, on CUDA a CUDA graph (from
        the cache or captured now); None without the fast path, or once a capture has failed (the error is
        kept in ``graph_error``; the eager steps are used instead).

        A single stream of an fp32 LSTM steps through Triton kernels where Triton runs (``use_triton``; a
        failure is kept in ``triton_error`` and the model's own step is captured instead)."""
        if self.fast and self.device.type == "cpu":
            return self._native_sampler(key, state, logits)
        if not (self.fast and self.device.type == "cuda" and self.graph_error is None):
            return None
        sampler = self._graphs.pop(key, None)
        if sampler is not None:
            sampler.reset(state, logits)
            return sampler
        config = SampleConfig(temperature=key[2], top_k=key[3], top_p=key[4], greedy=key[1])
        # The model's own step: cuDNN, the plain path's numbers in fewer kernels.
        steps: list[Callable[..., Any]] = [self.model_step]
        if key[0] == 1 and self.use_triton and self.triton_error is None:
            if self._triton_step is None:
                from .triton_step import triton_step  # imports Triton: only here, where it may be used

                self._triton_step = triton_step(self.stepper()) or False
            steps = [self._triton_step, *steps] if callable(self._triton_step) else steps
        for step in steps:
            try:
                return GraphSampler(step, state, logits, lambda lg, gumbel: pick_tokens(lg, config, None, gumbel),
                                    noisy=not config.greedy, track=key[5], block=BLOCK)
            except Exception as exc:  # any capture problem: the next step, then the eager fast steps for good
                if step is not steps[-1]:  # the Triton step
                    self.triton_error = exc
                    continue
                self.graph_error = exc
        return None

    def generate(self, prompt: str = "", length: int = 500, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, stop: Sequence[str] = (),
                 seed: int | None = None, label: str | None = None, guidance: float = 1.0) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece (the prompt itself is not repeated).

        With ``label`` the text is generated for that label and, unless ``stop`` says otherwise, ends
        where a labelled example ends (at a newline); ``guidance`` > 1 strengthens the label (see ``start``).
        """
        config = SampleConfig.for_label(label, tuple(stop), temperature=temperature, top_k=top_k, top_p=top_p,
                                        greedy=greedy, length=length, seed=seed)
        yield from self.continue_from(self.start(prompt, label, guidance), config)

    def sample(self, prompt: str = "", **options: Any) -> str:
        """The whole continuation of ``prompt`` as one string (see ``generate`` for the options)."""
        return "".join(self.generate(prompt, **options))

    def sample_many(self, n: int, prompt: str = "", length: int = 500, temperature: float = 0.8,
                    top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                    stop: Sequence[str] = (), seed: int | None = None, label: str | None = None,
                    guidance: float = 1.0) -> list[str]:
        """``n`` continuations of ``prompt``, generated together as one batch (options as for ``generate``)."""
        config = SampleConfig.for_label(label, tuple(stop), temperature=temperature, top_k=top_k, top_p=top_p,
                                        greedy=greedy, length=length, seed=seed)
        return self.continue_many(self.start(prompt, label, guidance), n, config)
