"""The network: one Encoder (embedding -> RNN stack) shared by its heads.

    tokens (B, T) --Embedding--> (B, T, E) --LSTM/GRU/RNN x L--> hidden (B, T, H) --LMHead--> logits (B, T, V)
                                   state in ---------^  \\--> state out (carried to the next window)

The recurrent state is a tuple of tensors, ``(h,)`` for GRU/RNN and ``(h, c)`` for LSTM, each (L, B, H).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import replace

from .config import ModelConfig
from .errors import CheckpointError

State = tuple[torch.Tensor, ...]

_RNNS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Encoder(nn.Module):
    """Embedding, dropout, then a multi-layer recurrent stack that takes and returns its state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.emb_dim)
        self.emb_dropout = nn.Dropout(config.emb_dropout)
        self.rnn = _RNNS[config.arch](
            config.emb_dim, config.hidden, config.layers, batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0, bidirectional=config.bidirectional)
        # PyTorch's default initialisation is kept on purpose: a forget-gate bias of 1 (Jozefowicz et al.)
        # measured 0.06 nats/char worse after 400 steps on tiny Shakespeare.

    @property
    def output_size(self) -> int:
        return self.config.hidden * (2 if self.config.bidirectional else 1)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        c = self.config
        shape = (c.layers * (2 if c.bidirectional else 1), batch_size, c.hidden)
        weight = self.embedding.weight
        zeros = torch.zeros(shape, device=device, dtype=weight.dtype)
        return (zeros, zeros.clone()) if c.arch == "lstm" else (zeros,)

    def _rnn(self, x: Any, hx: Any = None) -> Any:
        """The recurrent stack; while training with ``weight_drop``, with DropConnect on its W_hh matrices:
        one mask per matrix per call, shared by every time step (the regulariser of AWD-LSTM)."""
        if not (self.training and self.config.weight_drop > 0):
            return self.rnn(x, hx)
        dropped = {name: F.dropout(w, self.config.weight_drop)
                   for name, w in self.rnn.named_parameters() if name.startswith("weight_hh")}
        with warnings.catch_warnings():  # the dropped matrices are not in cuDNN's flat buffer: a copy, expected
            warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
            return torch.func.functional_call(self.rnn, dropped, (x, hx), strict=False)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        x = self.emb_dropout(self.embedding(tokens))  # (B, T, E)
        if state is None:
            hidden, out_state = self._rnn(x)
        else:
            hidden, out_state = self._rnn(x, state if self.config.arch == "lstm" else state[0])
        return hidden, (tuple(out_state) if isinstance(out_state, tuple) else (out_state,))  # (B, T, H)

    def forward_padded(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode right-padded sequences: hidden states (B, T, D) and each sequence's final state (B, D).

        A unidirectional stack never sees the padding before a sequence's end, so it runs unpacked
        (fast kernels) and its final state is read at ``lengths - 1``; a bidirectional one is packed,
        because its backward direction would otherwise start in the padding.
        """
        x = self.emb_dropout(self.embedding(tokens))
        if not self.config.bidirectional:
            hidden, _ = self._rnn(x)
            last = hidden[torch.arange(len(lengths), device=hidden.device), lengths.to(hidden.device) - 1]
            return hidden, last
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self._rnn(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        h = state[0] if isinstance(state, tuple) else state  # (layers * 2, B, H): the top layer's two directions
        return hidden, torch.cat([h[-2], h[-1]], dim=-1)


class LMHead(nn.Module):
    """Dropout then a projection to vocabulary logits; may share the embedding matrix (tied weights)."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        # A plain list keeps the tied embedding out of this module's parameters and state dict.
        self._tied = [embedding] if config.tie_weights else []
        self.proj = None if config.tie_weights else nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    @property
    def weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.proj.weight  # type: ignore[union-attr]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(hidden), self.weight, self.bias)  # (B, T, V)


class ClassifierHead(nn.Module):
    """Pools the hidden sequence (final state, masked mean and max, concatenated), then dropout and a linear."""

    def __init__(self, input_size: int, classes: list[str], dropout: float = 0.2) -> None:
        super().__init__()
        self.classes = list(classes)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(3 * input_size, len(classes))

    def spec(self) -> dict:
        return {"type": "classifier", "classes": self.classes, "dropout": self.dropout.p}

    def forward(self, hidden: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) from hidden (B, T, D), final states (B, D) and lengths (B,)."""
        mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :]
                < lengths.to(hidden.device)[:, None]).unsqueeze(-1)  # (B, T, 1): True on real tokens
        hidden = hidden.float()
        mean = (hidden * mask).sum(1) / lengths.to(hidden.device)[:, None].float()
        peak = hidden.masked_fill(~mask, float("-inf")).amax(1)
        return self.proj(self.dropout(torch.cat([last.float(), mean, peak], dim=-1)))


class RNNModel(nn.Module):
    """The encoder with its language-model head; ``heads`` holds further heads (e.g. classifiers)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.lm_head = LMHead(config, self.encoder.embedding)
        self.heads = nn.ModuleDict()

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Next-token logits (B, T, V) for every position, and the state after the last one."""
        hidden, state = self.encoder(tokens, state)
        return self.lm_head(hidden), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def classifier(self) -> ClassifierHead | None:
        head = self.heads["classifier"] if "classifier" in self.heads else None
        return head  # type: ignore[return-value]

    def classify(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) for right-padded token sequences."""
        if self.classifier is None:
            raise CheckpointError("this model has no classification head; train one with `rnngen classify train`")
        hidden, last = self.encoder.forward_padded(tokens, lengths)
        return self.classifier(hidden, last, lengths)

    def adapted(self, config: ModelConfig) -> RNNModel:
        """A copy with ``config``: other dropout rates, symbols appended to the tokenizer's, label tokens
        added or removed. Every kept symbol keeps its embedding and LM-head rows; new rows start fresh;
        the heads are carried over."""
        c = self.config
        require_same = ("arch", "emb_dim", "hidden", "layers", "tie_weights", "bidirectional")
        assert all(getattr(c, k) == getattr(config, k) for k in require_same), "only the vocabulary may grow"
        assert config.text_vocab_size >= c.text_vocab_size
        kept = [(i, i) for i in range(c.text_vocab_size)]
        kept += [(c.label_id(label), config.label_id(label)) for label in c.label_tokens
                 if label in config.label_tokens]
        old_rows, new_rows = (torch.tensor(rows) for rows in zip(*kept))
        adapted = RNNModel(config)
        for name, head in self.heads.items():
            adapted.heads[name] = head
        weights = adapted.state_dict()
        for key, value in self.state_dict().items():
            if key in ("encoder.embedding.weight", "lm_head.proj.weight", "lm_head.bias"):
                weights[key][new_rows] = value[old_rows]
            else:
                weights[key] = value
        adapted.load_state_dict(weights)
        return adapted

    def with_label_tokens(self, labels: list[str]) -> RNNModel:
        """A copy whose vocabulary also holds a token for each of ``labels`` not already in it."""
        new = [label for label in labels if label not in self.config.label_tokens]
        if not new:
            return self
        grown = self.adapted(replace(self.config, vocab_size=self.config.vocab_size + len(new),
                                     label_tokens=(*self.config.label_tokens, *new)))
        with torch.no_grad():
            grown.lm_head.bias[-len(new):] = -10.0  # a label token is never predicted as text
        return grown


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)


def attach_heads(model: RNNModel, config: dict) -> None:
    """Create the extra heads a checkpoint's config.json lists, so their weights can load."""
    for name, spec in (config.get("heads") or {}).items():
        if spec.get("type") == "classifier" and name == "classifier":
            model.heads[name] = ClassifierHead(model.encoder.output_size, spec["classes"], spec.get("dropout", 0.2))
            continue
        raise CheckpointError(f"the checkpoint has a head {name!r} of type {spec.get('type')!r} that this "
                              "rnngen does not know; upgrade rnngen")
