"""Choosing a language-model run's configuration for its corpus, its budget and the machine (``--preset auto``).

Every option the user gives wins; the rest is chosen here, by rules that each have a reason, and the choice is
said in one line before training, kept in config.json (``training.chosen``) and shown by `rnngen info`. A resumed
run keeps what was chosen: nothing is chosen again.

The rules and their reasons:

- **Budget.** ``--max-time`` alone trains for that time, ``--max-steps`` alone for those steps. With neither, the
  run reads the training text about ``DEFAULT_PASSES`` times (at least ``MIN_STEPS``, at most ``MAX_STEPS``
  steps) and stops early once ``DEFAULT_PATIENCE`` evaluations in a row have not improved: a small corpus is
  learnt without a guess at its size, a large one is bounded.
- **Tokenizer.** Characters, whatever the alphabet. Measured on Chinese (962k characters, 5,965 distinct; the
  benchmarks' `chinese`), BPE subwords of 8,000 led in the first minute (5.89 nats/char at 60 s, characters
  6.17) and then stopped learning (5.93 at 300 s, its training loss flat from the 100th step), while characters
  went on to 5.25 (the character-level reference: 6.46 and 5.39). Over an alphabet that large a vocabulary of
  8,000 is mostly single characters (1.7 characters a token): it shortens the text little and has the larger
  output layer. Subwords stay a choice (``--tokenizer bpe``).
- **Model.** On CUDA, 3x512 (the size that reached the lowest loss within 120 s on an H200 in the GPU
  benchmarks). On the CPU, 2x256 (the size whose throughput matches the reference char-LSTM), grown to 384 and
  then 512 hidden units while the larger size, at its measured speed, still reads ``TOKENS_PER_PARAMETER``
  training tokens per parameter in the time budget: a larger model learns more from each token but needs
  tokens to learn from. Measured on tiny Shakespeare in 600 s: 2x384 reading 6.8 tokens per parameter (1,579
  steps of 64x128) scored 1.4765, below what 2x256 reaches at any budget (1.48-1.49); 2x512 reading 2.3 (942
  steps) scored 1.4890, no better. A step budget, or none, keeps 2x256: there the size would set the time.
  The size is judged by what it reads at the full batch of 64 (where the threshold was measured).
- **Batch.** A timed CPU run then halves its batch to 32 where a step of 32 rows runs at least
  ``HALF_BATCH_UPDATES`` times as fast as one of 64 (it does on the 2-core CPUs measured: the LSTM kernels lose
  little at 32 rows): fewer tokens per second, more updates, and within a fixed time the updates won at every
  size and budget measured. AG News, 2x256 in 60 s: 1.840 nats/char against 1.950 (718 steps against 473);
  2x384 in 300 s: 1.362 against 1.395 (1,896 against 1,236); tiny Shakespeare, 2x256 in 300 s on another
  machine: 1.490 against 1.509; 2x384 in 600 s: a tie. A GPU keeps its batch (there a row costs little), and
  so does a step budget (half the batch would halve what it reads).
- **Schedule.** Warm-up, a constant peak, then a linear decay over the last fifth (``wsd``): measured on a
  465 kB corpus in 120 s (issue 17), a cosine over a short budget halves the mean learning rate and cost 0.2
  nats/char; a run bounded by time does not know its length until it nears the end, where the decay sits.
- **Regularisation.** Dropout only when the run will read the corpus more than ``OVERFIT_PASSES`` times:
  before that the model is still underfitting and dropout only slows it down (measured in the same 120 s).
  The expected passes come from the measured speed (a probe: the median of the steps timed over a second) and the budget.
- **Evaluation.** About ``EVALUATIONS`` evaluations per run, each on at most ``EVAL_TOKENS`` validation
  tokens, and with a time budget on no more than all of them can read in ``EVAL_SHARE`` of it (reading runs
  about ``EVAL_SPEEDUP`` times as fast as training, per token): measured at 60 s on 2 MB corpora, full
  evaluations took a fifth of the budget and the reference, which evaluates once, came out ahead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import ClassifyConfig, ModelConfig, TrainConfig
from .corpora import Corpus
from .model import RNNModel
from .runtime import autocast, use_bf16

DEFAULT_PASSES = 20
MIN_STEPS, MAX_STEPS = 1000, 20000
DEFAULT_PATIENCE = 5
SUBWORD_VOCAB = 8000
OVERFIT_PASSES = 20
EVALUATIONS = 10
EVAL_TOKENS = 1 << 20
EVAL_SHARE, EVAL_SPEEDUP, MIN_EVAL_TOKENS = 0.05, 3.0, 16_384
SAMPLE_CHARS = 32 << 20  # characters of a large corpus read for its statistics
PROBE_SECONDS = 1.0  # the probe times steps for at least this long (after one untimed step) ...
PROBE_STEPS = (3, 30)  # ... and at least, at most this many: the median step is the speed
CPU_HIDDEN = (256, 384, 512)  # the sizes a timed CPU run grows through
TOKENS_PER_PARAMETER = 5  # between the 2.3 that lost and the 6.8 that won (the Model rule above)
HALF_BATCH_UPDATES = 4 / 3  # a timed CPU run halves its batch where half makes this many times the steps


@dataclass(frozen=True)
class CorpusStats:
    """What the choice needs to know of a corpus (from its first ``SAMPLE_CHARS`` characters)."""

    chars: int  # in the sample
    alphabet: int  # distinct characters
    whole: bool  # the sample is the whole corpus

    @classmethod
    def of(cls, corpus: Corpus) -> CorpusStats:
        seen: set[str] = set()
        read, whole = 0, True
        for chunk in corpus.chunks():
            seen.update(chunk)
            read += len(chunk)
            if read >= SAMPLE_CHARS:
                whole = False
                break
        return cls(read, len(seen), whole)


@dataclass
class Choice:
    """The options chosen (only those the user left unset), why, and the line that says so."""

    options: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    line: str = ""

    def set(self, given: dict[str, Any], name: str, value: Any, reason: str) -> None:
        """Choose ``value`` for ``name`` unless the user gave it."""
        if given.get(name) is None:
            self.options[name] = value
            self.reasons.append(f"{name} {value}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "options": self.options, "reasons": self.reasons}


def choose_tokenizer(stats: CorpusStats, given: dict[str, Any], choice: Choice) -> None:
    choice.set(given, "tokenizer", "char", f"{stats.alphabet:,} distinct characters (characters, whatever the "
                                           "alphabet: measured)")


def choose_model(device: torch.device, given: dict[str, Any], choice: Choice, max_time: float | None = None,
                 batch: int = 64, seq_len: int = 128, speed_of: Callable[[int, int, int], float] | None = None,
                 parameters_of: Callable[[int, int], int] | None = None) -> float | None:
    """Layers, hidden size and, for a timed CPU run, the batch; returns the steps per second of what was chosen
    where a time budget was given.

    ``speed_of(layers, hidden, batch)`` measures steps per second (the probe) and ``parameters_of(layers,
    hidden)`` counts the parameters. On the CPU, with ``--max-time``, the hidden size grows through
    ``CPU_HIDDEN`` while the larger size, at ``batch``, still reads ``TOKENS_PER_PARAMETER`` tokens per parameter
    in the budget; then the batch is halved where half the batch makes ``HALF_BATCH_UPDATES`` times the steps."""
    cuda = device.type == "cuda"
    layers = given.get("layers") or (3 if cuda else 2)
    hidden = given.get("hidden") or (512 if cuda else CPU_HIDDEN[0])
    choice.set(given, "layers", layers, f"on {device.type}")
    if not max_time or speed_of is None or parameters_of is None:
        choice.set(given, "hidden", hidden, f"on {device.type}")
        return None
    speed = speed_of(layers, hidden, batch)
    if cuda:
        choice.set(given, "hidden", hidden, f"on {device.type}")
        return speed

    def per_parameter(steps_per_second: float, size: int) -> float:
        return max_time * steps_per_second * batch * seq_len / parameters_of(layers, size)

    if given.get("hidden") is None:
        for larger in CPU_HIDDEN[1:]:
            # A larger size is never faster: where the smaller one's speed would not read enough, skip its probe.
            if per_parameter(speed, larger) < TOKENS_PER_PARAMETER:
                break
            larger_speed = speed_of(layers, larger, batch)
            if per_parameter(larger_speed, larger) < TOKENS_PER_PARAMETER:
                break
            hidden, speed = larger, larger_speed
        choice.set(given, "hidden", hidden, f"reads ~{per_parameter(speed, hidden):.0f} tokens per parameter in "
                                            f"{max_time:g} s at batch {batch} (a size grows while it reads "
                                            f"{TOKENS_PER_PARAMETER})")
    if given.get("batch_size") is None and batch > 1:
        half_speed = speed_of(layers, hidden, batch // 2)
        if half_speed >= HALF_BATCH_UPDATES * speed:
            choice.set(given, "batch_size", batch // 2, f"{half_speed / speed:.1f}x the updates, "
                                                       f"{half_speed / (2 * speed):.0%} of the tokens per second")
            speed = half_speed
    return speed


def default_steps(train_tokens: int, tokens_per_step: int) -> int:
    """Steps that read the training text DEFAULT_PASSES times, within [MIN_STEPS, MAX_STEPS]."""
    return max(MIN_STEPS, min(MAX_STEPS, round(DEFAULT_PASSES * train_tokens / max(1, tokens_per_step))))


def probe_steps_per_second(model_config: ModelConfig, config: TrainConfig, device: torch.device) -> float:
    """Training steps per second of this model and batch on this machine: the median step on random tokens."""
    torch.manual_seed(0)
    model = RNNModel(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model_config.vocab_size, (config.batch_size, config.seq_len + 1), device=device)
    bf16 = use_bf16(device, config.precision)

    def step() -> None:
        with autocast(device, bf16):
            logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not its queueing

    step()  # the first step allocates and warms up the kernels
    return 1.0 / median_seconds(step)


def median_seconds(step: Callable[[], None]) -> float:
    """The median time of ``step``, timed for ``PROBE_SECONDS`` within ``PROBE_STEPS``: on a 2-core machine one
    step in a few runs long (another process, the OS), and three steps timed together gave 1.5 to 3.4 steps/s
    for the same model where the run then made 2.2 to 2.4."""
    fewest, most = PROBE_STEPS
    times: list[float] = []
    while len(times) < most and (len(times) < fewest or sum(times) < PROBE_SECONDS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    times.sort()
    return max(1e-9, times[len(times) // 2])


def choose_recipe(config: TrainConfig, given: dict[str, Any], train_tokens: int, steps_per_second: float | None,
                  choice: Choice) -> tuple[int | None, float]:
    """Budget, schedule, regularisation and evaluation cadence; returns the steps expected and the passes."""
    tokens_per_step = config.batch_size * config.seq_len
    if config.max_steps is None and config.max_time is None:
        steps = default_steps(train_tokens, tokens_per_step)
        choice.set(given, "max_steps", steps, f"about {DEFAULT_PASSES} passes over the training text")
        choice.set(given, "patience", DEFAULT_PATIENCE, "stop once validation stops improving")
    expected = config.max_steps or choice.options.get("max_steps")
    if config.max_time and steps_per_second:
        by_time = round(config.max_time * steps_per_second)
        expected = min(expected, by_time) if expected else by_time
    passes = (expected or 0) * tokens_per_step / max(1, train_tokens)
    choice.set(given, "schedule", "wsd", "constant rate, decay at the end: right for any budget")
    if passes < OVERFIT_PASSES:
        choice.set(given, "dropout", 0.0, f"~{passes:.0f} passes over the text: still underfitting")
    if expected:
        choice.set(given, "eval_every", max(25, round(expected / EVALUATIONS)), f"about {EVALUATIONS} evaluations")
    eval_tokens = EVAL_TOKENS
    if config.max_time and steps_per_second:
        readable = config.max_time * EVAL_SHARE * steps_per_second * tokens_per_step * EVAL_SPEEDUP / EVALUATIONS
        eval_tokens = int(max(MIN_EVAL_TOKENS, min(EVAL_TOKENS, readable)))
    choice.set(given, "eval_max_tokens", eval_tokens, "evaluation stays a small share of the budget")
    return expected, passes


def describe(options: dict[str, Any], stats: CorpusStats, config: TrainConfig, expected: int | None,
             steps_per_second: float | None, device: torch.device) -> str:
    """The one line said before training: e.g. ``2x256 lstm, char, batch 64, lr 2e-3 wsd, dropout 0: ...``."""
    budget = (f"{config.max_time:g} s" if config.max_time else "") + (
        f"{' or ' if config.max_time else ''}{config.max_steps:,} steps" if config.max_steps else "")
    speed = f", ~{steps_per_second:.1f} steps/s" if steps_per_second else ""
    total = f" (~{expected:,} steps)" if expected and config.max_time else ""
    size = f"{options['chars'] / 1e3:,.0f}k chars" if stats.whole else f">{stats.chars / 1e6:,.0f}M chars"
    return (f"{options['layers']}x{options['hidden']} {options['arch']}, {options['tokenizer']}, batch {config.batch_size},"
            f" lr {config.lr:g} {config.schedule}, dropout {options['dropout']:g}: {size}, {budget}{total} on "
            f"{device.type}{speed}")


# -- classification -----------------------------------------------------------------------------------------
#
# - **Tokenizer.** Texts whose median is ``LONG_TEXT`` characters or more (sentences, articles) are read as BPE
#   subwords: their classes are carried by words, and the recurrent part reads about four times fewer tokens,
#   so four times more of each text in the same time. Shorter texts (names, codes, one line of a program) are
#   read as characters: their spelling is what tells their classes apart. Subword vocabulary: SUBWORD_VOCAB
#   pieces, or one per ``CHARS_PER_PIECE`` characters of a small data set (its rare pieces would be learnt
#   from a few examples; more than the data can fill shrinks to what it can), and never fewer than a piece
#   for every character used and the 256 bytes, which sentencepiece keeps (nothing becomes unknown).
# - **Bag of n-grams.** Always: a TF-IDF-weighted linear model of each whole text's n-grams, the baseline every
#   text classifier is measured against, trained beside the recurrent part; the share of each in the scores is
#   chosen on validation, so the pair is never much worse than the better of the two. Words: 1-2-grams of
#   subwords; characters: 1-4-grams (what the linear baselines use).
# - **Word dropout.** Measured best: 0.3 of the characters of surnames (0.842 against 0.829 without), 0.4-0.5 of
#   the subwords of AG News (0.86 against 0.82); a classifier that cannot lean on one token generalises.
# - **Epochs.** With ``--max-time`` the time decides (up to ``TIMED_EPOCHS``, no early stopping: the bag of
#   n-grams starts at its final accuracy, so the validation accuracy of the pair stands still while the
#   recurrent part is still learning; measured on AG News, early stopping ended a 1,800 s run at 378 s with the
#   recurrent part at chance). Without it, enough epochs for at least ``CLASSIFY_STEPS`` steps (between 10 and
#   ``UNTIMED_EPOCHS``; a small data set needs more passes) and validation accuracy stops the run after
#   ``CLASSIFY_PATIENCE`` evaluations without progress. Either way the best validation accuracy is kept.
#   Schedule ``wsd``: a run bounded by time does not know its length until it nears the end.

LONG_TEXT = 100
CHARS_PER_PIECE = 200
KEPT_PIECES = 256 + 8  # byte pieces, and room for the special ones
CLASSIFY_STEPS = 3000
UNTIMED_EPOCHS, TIMED_EPOCHS = 50, 500
CLASSIFY_PATIENCE = 5


@dataclass(frozen=True)
class LabelledStats:
    """What the classifier's choice needs to know of its training texts."""

    texts: int
    chars: int
    median_chars: int
    alphabet: int

    @classmethod
    def of(cls, texts: list[str]) -> LabelledStats:
        lengths = sorted(len(t) for t in texts)
        alphabet: set[str] = set()
        for text in texts:
            alphabet.update(text)
        return cls(len(texts), sum(lengths), lengths[len(lengths) // 2] if lengths else 0, len(alphabet))


def choose_classifier(stats: LabelledStats, config: ClassifyConfig, given: dict[str, Any], choice: Choice,
                      new_model: bool) -> None:
    """Tokenizer (``new_model`` only: fine-tuning keeps its base's), bag of n-grams, word dropout, epochs."""
    subwords = stats.median_chars >= LONG_TEXT
    if new_model:
        if subwords:
            vocab = max(stats.alphabet + KEPT_PIECES, min(SUBWORD_VOCAB, stats.chars // CHARS_PER_PIECE))
            choice.set(given, "tokenizer", "bpe", f"median text {stats.median_chars:,} characters: words")
            choice.set(given, "vocab_size", vocab, "subword vocabulary")
        else:
            choice.set(given, "tokenizer", "char", f"median text {stats.median_chars:,} characters: spelling")
    words = (given.get("tokenizer") or choice.options.get("tokenizer")) == "bpe"
    choice.set(given, "ngrams", 2 if words else 4, "bag of n-grams beside the recurrent part")
    choice.set(given, "token_dropout", 0.4 if words else 0.3, "word dropout")
    steps_per_epoch = max(1, round(stats.texts * (1 - config.val_fraction) / config.batch_size))
    if config.max_time:
        choice.set(given, "max_epochs", TIMED_EPOCHS, "the time decides")
        choice.set(given, "patience", TIMED_EPOCHS, "no early stopping: the time decides")
    else:
        epochs = min(UNTIMED_EPOCHS, max(10, -(-CLASSIFY_STEPS // steps_per_epoch)))
        choice.set(given, "max_epochs", epochs, f"at least {CLASSIFY_STEPS:,} steps")
        choice.set(given, "patience", CLASSIFY_PATIENCE, "stop once validation accuracy stops improving")
    choice.set(given, "schedule", "wsd", "constant rate, decay at the end: right for any budget")


def describe_classifier(options: dict[str, Any], stats: LabelledStats, config: ClassifyConfig,
                        char_ngrams: int) -> str:
    """The one line said before training: e.g. ``bpe 8000 + bag of 1-2-grams, 2x256 lstm, word dropout 0.4 ...``
    (``char_ngrams``: the character n-grams the head's bag holds beside its token n-grams)."""
    vocab = f" {options['vocab_size']:,}" if options["tokenizer"] == "bpe" else ""
    chars = f" and 1-{char_ngrams} characters" if char_ngrams else ""
    bag = f" + bag of 1-{config.ngrams}-grams{chars}" if config.ngrams else ""
    budget = f"{config.max_time:g} s" if config.max_time else f"up to {config.max_epochs} epochs"
    return (f"{options['tokenizer']}{vocab}{bag}, {options['layers']}x{options['hidden']} {options['arch']}, "
            f"word dropout {config.token_dropout:g}, lr {config.lr:g} {config.schedule}: {stats.texts:,} texts "
            f"(median {stats.median_chars:,} characters), {budget}")
