"""Frozen configuration dataclasses; each converts to and from a plain JSON-able dict.

Each field that a user sets from the command line carries its help text in ``metadata["help"]``: the CLI
generates its options (and their ``[default: ...]``) from these fields, so a default lives in one place.
``metadata["cli"] = False`` keeps a field off the command line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")

ARCHS = ("lstm", "gru", "rnn")
TOKENIZERS = ("char", "bpe", "unigram")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "wsd")
PRESETS = ("auto", "plain")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A field with a default and the help text of its command-line option (``extra``: choices, short, shown)."""
    return field(default=default, metadata={"help": help, **extra})


def internal(default: Any) -> Any:
    """A field with no command-line option."""
    return field(default=default, metadata={"cli": False})


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_options(options: dict[str, Any], *groups: type, what: str = "option") -> list[dict[str, Any]]:
    """``options`` sorted into one dict per config class of ``groups`` (in that order; a name goes to the
    first class that has it); unset (None) values are dropped, unknown names refused."""
    unknown = set(options) - set().union(*(field_names(cls) for cls in groups))
    if unknown:
        raise InputError(f"unknown {what}(s): {', '.join(sorted(unknown))}")
    taken: set[str] = set()
    parts = []
    for cls in groups:
        names = field_names(cls) - taken
        parts.append({k: v for k, v in options.items() if k in names and v is not None})
        taken |= names
    return parts


def pick(options: dict[str, Any], cls: type) -> dict[str, Any]:
    """The set values of ``options`` that are options of ``cls`` (not its internal fields)."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    return {k: v for k, v in options.items() if k in names and v is not None}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network: embedding -> RNN stack -> heads."""

    vocab_size: int = field(metadata={"cli": False})
    arch: str = option("lstm", "Recurrent cell.", choices=ARCHS)
    layers: int = option(2, "Recurrent layers.")
    hidden: int = option(256, "Hidden units per layer.")
    emb_dim: int = option(64, "Embedding size.")
    dropout: float = option(0.1, "Dropout between layers and before the output.")
    emb_dropout: float = option(0.0, "Dropout on embeddings.")
    # DropConnect on the hidden-to-hidden matrices while training (AWD-LSTM)
    weight_drop: float = option(0.0, "Dropout on the hidden-to-hidden weights while training (DropConnect).")
    tie_weights: bool = option(False, "Share embedding and output matrices.")
    bidirectional: bool = option(False, "A bidirectional encoder (classifies, cannot generate).")
    # Label tokens (for label-conditioned generation) sit after the tokenizer's symbols: the last
    # len(label_tokens) rows of the embedding and the LM head.
    label_tokens: tuple[str, ...] = internal(())

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        require(self.vocab_size >= 2, "the vocabulary needs at least 2 symbols: use a longer corpus")
        for name in ("layers", "hidden", "emb_dim"):
            require(getattr(self, name) >= 1, f"{flag(name)} must be at least 1")
        for name in ("dropout", "emb_dropout", "weight_drop"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{flag(name)} must be in [0, 1), got {value}")
        require(not self.tie_weights or self.emb_dim == self.hidden,
                "--tie-weights needs --emb-dim equal to --hidden")
        object.__setattr__(self, "label_tokens", tuple(self.label_tokens))  # JSON gives a list

    @property
    def text_vocab_size(self) -> int:
        """Symbols of the tokenizer (the vocabulary without label tokens)."""
        return self.vocab_size - len(self.label_tokens)

    def label_id(self, label: str) -> int:
        return self.text_vocab_size + self.label_tokens.index(label)


SHAPE_FIELDS = ("arch", "emb_dim", "hidden", "layers", "tie_weights", "bidirectional")  # what fine-tuning keeps


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer a new run fits on its text."""

    tokenizer: str = option("char", "Characters, or sentencepiece subwords.", choices=TOKENIZERS)
    vocab_size: int = option(2000, "Subword vocabulary size for bpe/unigram.")
    min_char_count: int = option(1, "Fold characters seen fewer times into <unk>.")

    def __post_init__(self) -> None:
        require(self.tokenizer in TOKENIZERS, f"unknown --tokenizer {self.tokenizer!r}: use char, bpe or unigram")
        require(self.vocab_size >= 2 and self.min_char_count >= 1,
                "--vocab-size must be at least 2 and --min-char-count at least 1")


@dataclass(frozen=True)
class RunConfig:
    """What every training run shares: optimisation, schedule, budget, evaluation, stopping and hardware."""

    batch_size: int = option(64, "Sequences per batch.", short="-b")
    lr: float = option(2e-3, "Peak learning rate.")
    min_lr_ratio: float = option(0.05, "Where the cosine decay ends, as a share of --lr.")
    warmup_steps: int = option(50, "Linear warm-up steps.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    grad_clip: float = option(1.0, "Gradient norm clip.")
    # The moving average of the weights that is evaluated and kept (Polyak averaging); 0: off.
    ema: float = option(0.0, "Evaluate and keep a moving average of the weights with this decay, e.g. 0.999 "
                             "(0 = off).")
    max_steps: int | None = option(1000, "Stop after this many steps.")
    # Seconds; the schedule follows whichever budget ends first.
    max_time: float | None = option(None, "Stop after this many seconds (the schedule fits it).", shown="none")
    eval_every: int | None = option(200, "Evaluate and checkpoint every N steps.")
    patience: int | None = option(None, "Stop after N evaluations without improvement.", shown="off")
    save_every: int | None = option(None, "Also save the resume checkpoint every N steps.", shown="off")
    # A resume point by wall time too, whatever the speed of the machine: a run killed before its first
    # evaluation (a slow or busy machine, a large model) still has something to continue from.
    save_time: float = option(300.0, "Also save the resume checkpoint every this many seconds of training, the "
                                     "first within a minute (0 = off).")
    val_fraction: float = option(0.1, "Share of the corpus (from the end) held out.")
    seed: int = option(1337, "Random seed.")
    device: str = option("auto", "auto, cpu, cuda or mps.")
    precision: str = option("auto", "Compute precision; auto = bf16 on CUDA and on CPUs with native bf16.",
                            choices=PRECISIONS)
    schedule: str = option("cosine", "Learning rate after the warm-up: cosine decay over the budget, or wsd "
                                     "(constant, then a linear decay over its last fifth).", choices=SCHEDULES)
    max_nan_retries: int = internal(3)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "--batch-size must be at least 1")
        for name in ("max_steps", "eval_every", "patience", "save_every"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{flag(name)} must be at least 1")
        require(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        require(math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number")
        require(self.grad_clip > 0, "--grad-clip must be positive")
        require(0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be between 0 and 1")
        require(self.weight_decay >= 0, "--weight-decay must not be negative")
        require(0.0 < self.val_fraction < 1.0, "--val-fraction must be between 0 and 1")
        require(self.max_time is None or self.max_time > 0, "--max-time must be positive")
        require(math.isfinite(self.save_time) and self.save_time >= 0, "--save-time must not be negative")
        require(0.0 <= self.ema < 1.0, "--ema must be in [0, 1), e.g. 0.999 (0 turns it off)")
        require(self.precision in PRECISIONS, "--precision must be auto, fp32 or bf16")
        require(self.schedule in SCHEDULES, "--schedule must be cosine or wsd")
        require(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
                f"unknown device {self.device!r}: use auto, cpu, cuda or mps")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """How to train a language model: the run's settings, and the windows of text it reads."""

    # None with no --max-time either: the preset decides (see choose.py; plain: 1000).
    max_steps: int | None = option(None, "Stop after this many steps.",
                                   shown="fits the corpus; none with --max-time alone")
    eval_every: int = option(200, "Evaluate and checkpoint every N steps.")  # type: ignore[assignment]
    preset: str = option("auto", "auto: choose the model and the recipe for the corpus, the budget and the machine "
                                 "(every option given wins; said in one line at the start); plain: the fixed "
                                 "defaults shown here, and 1,000 steps when no budget is given.", choices=PRESETS)
    seq_len: int = option(128, "Tokens per backpropagation window.")
    # Share of windows that start from a fresh state instead of the carried one.
    state_reset: float = option(0.3, "Share of windows that start from a fresh state, not the carried one.")
    eval_max_tokens: int | None = option(None, "Cap on validation tokens per evaluation.", shown="all")
    # Tokens sampled at each evaluation, for the caller to show; 0: none.
    sample_length: int = option(0, "Show this many tokens sampled from the model at each evaluation (0: none).",
                                shown="200; 0 with --quiet or --json")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.seq_len >= 1, "--seq-len must be at least 1")
        require(0.0 <= self.state_reset <= 1.0, "--state-reset must be between 0 and 1")
        require(self.sample_length >= 0, "--sample-length must not be negative (0 shows no samples)")


VOTE_GRID = tuple(i / 8 for i in range(13))  # LM vote weights tried on the validation set: 0 to 1.5


@dataclass(frozen=True)
class ClassifyConfig(RunConfig):
    """How to train a classifier (and its auxiliary language model)."""

    batch_size: int = option(32, "Texts per batch.", short="-b")
    lr: float = option(2e-3, "Peak learning rate of the top layers.")
    max_steps: int | None = option(None, "Stop after this many steps (instead of --max-epochs).", shown="off")
    eval_every: int | None = option(None, "Evaluate and checkpoint every N steps.", shown="every epoch")
    patience: int | None = option(3, "Stop after N evaluations without better accuracy.")
    val_fraction: float = option(0.2, "Share of each class held out.")
    max_epochs: int = option(10, "Passes over the training texts.")
    max_len: int = option(256, "Tokens of each text read (its beginning).")
    ngrams: int = option(0, "Add a linear model of each whole text's bag of token n-grams (1 to N tokens, "
                            "TF-IDF weighted; a subword model's bag also holds 1-4-grams of characters), fitted first on "
                            "all the labelled texts, to the recurrent classifier (0 = off).",
                         shown="auto: 4 for characters, 2 for subwords; plain: 0")
    balance: bool = option(False, "Weight classes by inverse frequency.")
    lm_weight: float = option(0.5, "Weight of the auxiliary language-model loss on the texts, which keeps the "
                                   "model generating (0 = off).")
    # Share of LM texts read without their label (after a newline instead), so that the model also
    # knows unlabelled text: what classifier-free guidance (`sample --guidance`) contrasts the label with.
    label_dropout: float = option(0.1, "Share of the language-model texts read without their label, so that "
                                       "`sample --guidance` works.")
    head_dropout: float = option(0.2, "Dropout before the classifier.")
    token_dropout: float = option(0.0, "Share of each training text's tokens read as <unk> by the classifier "
                                       "(word dropout).")
    label_smoothing: float = option(0.0, "Share of each training target spread evenly over all classes.")
    # Weight of the label-conditioned LM's vote in classification (see classify.class_log_scores); None: chosen
    # at each evaluation from VOTE_GRID on the validation set; 0: the head alone.
    lm_vote: float | None = option(None, "Weight of the language model's vote in classification: its "
                                         "log p(text | label) + log p(label), added to the head's "
                                         "log-probabilities (0 = the head alone).",
                                   shown="auto, chosen on the validation set", metavar="WEIGHT|auto")
    preset: str = option("auto", "auto: choose the tokenizer, the bag of n-grams, word dropout and the epochs for "
                                 "the data and the budget (every option given wins; said in one line at the "
                                 "start); plain: the fixed defaults shown here.", choices=PRESETS)
    lr_decay: float = option(2.6, "Fine-tuning: each lower layer group learns this much slower.")
    unfreeze_every: int | None = option(None, "Fine-tuning: unfreeze one more layer group every N steps.",
                                        shown="one epoch")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_epochs", "max_len"):
            require(getattr(self, name) >= 1, f"{flag(name)} must be at least 1")
        require(0 <= self.ngrams <= 8, "--ngrams must be from 0 (off) to 8")
        require(self.unfreeze_every is None or self.unfreeze_every >= 1, "--unfreeze-every must be at least 1")
        require(math.isfinite(self.lm_weight) and self.lm_weight >= 0, "--lm-weight must not be negative")
        for name in ("label_dropout", "head_dropout", "token_dropout", "label_smoothing"):
            require(0.0 <= getattr(self, name) < 1.0, f"{flag(name)} must be in [0, 1)")
        require(self.lm_vote is None or (math.isfinite(self.lm_vote) and self.lm_vote >= 0),
                "--lm-vote must be a weight of 0 or more, or auto")
        require(self.lr_decay >= 1.0, "--lr-decay must be at least 1")


LABELLED_END = ("\n",)  # a labelled example's text ends at a newline (see classify.py)


@dataclass(frozen=True)
class SampleConfig:
    """How to pick each next token."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    length: int = 500
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        require(math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature must be a positive number, got {self.temperature}")
        require(self.top_k is None or self.top_k >= 1, f"top-k must be at least 1, got {self.top_k}")
        require(self.top_p is None or (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0),
                f"top-p must be in (0, 1], got {self.top_p}")
        require(self.length >= 0, f"length must not be negative, got {self.length}")
        require(all(self.stop), "a stop string must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def for_label(cls, label: str | None, stop: tuple[str, ...] | list[str] = (), **fields: Any) -> SampleConfig:
        """Settings for a text generated for ``label``: unless ``stop`` says otherwise, it ends where a labelled
        example ends (at a newline)."""
        return cls(stop=tuple(stop) or (LABELLED_END if label is not None else ()), **fields)
