"""Frozen configuration dataclasses; each converts to and from a plain JSON-able dict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")

ARCHS = ("lstm", "gru", "rnn")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network: embedding -> RNN stack -> heads."""

    vocab_size: int
    arch: str = "lstm"
    emb_dim: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.1  # between layers and on the outputs
    emb_dropout: float = 0.0
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden matrices while training (AWD-LSTM)
    tie_weights: bool = False
    bidirectional: bool = False
    # Label tokens (for label-conditioned generation) sit after the tokenizer's symbols: the last
    # len(label_tokens) rows of the embedding and the LM head.
    label_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        require(self.vocab_size >= 2, "the vocabulary needs at least 2 symbols: use a longer corpus")
        require(self.layers >= 1, "--layers must be at least 1")
        require(self.hidden >= 1, "--hidden must be at least 1")
        require(self.emb_dim >= 1, "--emb-dim must be at least 1")
        for name in ("dropout", "emb_dropout", "weight_drop"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        require(not self.tie_weights or self.emb_dim == self.hidden,
                 "--tie-weights needs --emb-dim equal to --hidden")
        object.__setattr__(self, "label_tokens", tuple(self.label_tokens))  # JSON gives a list

    @property
    def text_vocab_size(self) -> int:
        """Symbols of the tokenizer (the vocabulary without label tokens)."""
        return self.vocab_size - len(self.label_tokens)

    def label_id(self, label: str) -> int:
        return self.text_vocab_size + self.label_tokens.index(label)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and stopping."""

    batch_size: int = 64
    seq_len: int = 128
    state_reset: float = 0.3  # share of windows that start from a fresh state instead of the carried one
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 1000
    max_time: float | None = None  # seconds; the schedule follows whichever budget ends first
    eval_every: int = 200
    eval_max_tokens: int | None = None
    patience: int | None = None  # evaluations without improvement before stopping
    save_every: int | None = None  # periodic "last" checkpoints between evaluations (steps)
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    val_fraction: float = 0.1
    max_nan_retries: int = 3
    ema: float = 0.0  # decay of the moving average of the weights that is evaluated and kept; 0: off
    sample_length: int = 0  # tokens sampled at each evaluation, for the caller to show; 0: none

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "max_steps", "eval_every"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        require(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        require(math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number")
        require(self.grad_clip > 0, "--grad-clip must be positive")
        require(0.0 <= self.state_reset <= 1.0, "--state-reset must be between 0 and 1")
        require(0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be between 0 and 1")
        require(self.weight_decay >= 0, "--weight-decay must not be negative")
        require(0.0 < self.val_fraction < 1.0, "--val-fraction must be between 0 and 1")
        require(self.max_time is None or self.max_time > 0, "--max-time must be positive")
        require(self.patience is None or self.patience >= 1, "--patience must be at least 1")
        require(self.save_every is None or self.save_every >= 1, "--save-every must be at least 1")
        require(self.sample_length >= 0, "--sample-length must not be negative (0 shows no samples)")
        require(0.0 <= self.ema < 1.0, "--ema must be in [0, 1), e.g. 0.999 (0 turns it off)")
        require(self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16")
        require(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
                 f"unknown device {self.device!r}: use auto, cpu, cuda or mps")


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
