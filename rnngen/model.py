"""The network: one Encoder (embedding -> RNN stack) shared by its heads.

    tokens (B, T) --Embedding--> (B, T, E) --LSTM/GRU/RNN x L--> hidden (B, T, H) --LMHead--> logits (B, T, V)
                                   state in ---------^  \\--> state out (carried to the next window)

The recurrent state is a tuple of tensors, ``(h,)`` for GRU/RNN and ``(h, c)`` for LSTM, each (L, B, H).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
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


Bag = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # bucket ids (N,), offsets (B,), counts (N,)

BAG_BUCKETS = 2 ** 18  # hashed n-gram buckets: collisions stay rare up to ~100k distinct n-grams
# The n-gram hash (written into exported folders, which compute it outside rnngen): an n-gram (t1..tn) starts
# from n * BAG_SEED, takes h = h * BAG_MULTIPLIER + t for each token with int64 wrap-around, then h ^= h >>
# BAG_SHIFT (mixing the high bits into the low ones the modulus keeps); its bucket is h mod BAG_BUCKETS.
BAG_SEED = 0x9E3779B1  # distinct starts for each n, so "ab" and "a" hash apart
BAG_CHAR_SEED = 0x85EBCA77  # the same for n-grams of characters, so they hash apart from token n-grams
BAG_MULTIPLIER = 1_000_003
BAG_SHIFT = 29
# Subword classifiers' bags also hold each text's character 1- to 4-grams (the n-grams the TF-IDF baselines
# read): measured with the bag alone (2026-12-01), subword 1-2-grams 0.848 / 0.867 on man pages / AG News,
# character 1-4-grams 0.869 / 0.870, both 0.862 / 0.871; the baseline 0.855 / 0.873. Both is the rule: words
# and pairs of words for topics, characters for the parts of words (names, suffixes, code).
CHAR_NGRAMS = 4


def ngram_hashes(ids: np.ndarray, ngrams: int, seed: int = BAG_SEED) -> list[np.ndarray]:
    """The hashes of the 1- to ``ngrams``-grams of ``ids`` (see BAG_SEED), one array per n."""
    ids = np.asarray(ids, dtype=np.int64)
    grams = []
    for n in range(1, ngrams + 1):
        if len(ids) < n:
            break
        h = np.full(len(ids) - n + 1, n * seed, dtype=np.int64)
        for k in range(n):
            h = h * np.int64(BAG_MULTIPLIER) + ids[k: len(ids) - n + 1 + k]
        grams.append(h)
    return grams


def bag_of_ngrams(ids: np.ndarray, ngrams: int, text: str = "", char_ngrams: int = 0,
                  buckets: int = BAG_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """The hashed n-grams (1 to ``ngrams`` tokens) of a token sequence, and with ``char_ngrams`` the 1- to
    ``char_ngrams``-grams of the characters (code points) of ``text``: sorted bucket ids and their counts."""
    grams = ngram_hashes(ids, ngrams)
    if char_ngrams:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        grams += ngram_hashes(points, char_ngrams, BAG_CHAR_SEED)
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    hashed = np.concatenate(grams)
    hashed ^= hashed >> BAG_SHIFT
    unique, counts = np.unique(np.mod(hashed, buckets), return_counts=True)
    return unique.astype(np.int64), counts.astype(np.float32)


class ClassifierHead(nn.Module):
    """Pools the hidden sequence (final state, masked mean and max, concatenated), then dropout and a linear.

    With ``ngrams`` > 0 it also has a linear model of the text's bag of hashed token n-grams (and with
    ``char_ngrams`` of character n-grams: model.CHAR_NGRAMS), weighted as in
    TF-IDF (log counts times the inverse document frequency, L2-normalised): what a topic task rewards,
    read over the whole text however long, while the recurrent encoder reads its beginning. The bag is a
    logistic regression fitted on its own (classify.fit_bag) and the recurrent part trains beside it with its
    own loss (trained on one summed logit, whichever fits the training texts first leaves the other nothing to
    learn from: measured, the pair then classified worse than the bag alone); their log-probabilities are
    mixed with the share ``bag_share`` chosen on validation."""

    def __init__(self, input_size: int, classes: list[str], dropout: float = 0.2, ngrams: int = 0,
                 char_ngrams: int = 0) -> None:
        super().__init__()
        self.classes = list(classes)
        self.ngrams, self.char_ngrams = ngrams, char_ngrams  # the bag's token and character n-grams
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(3 * input_size, len(classes))
        if ngrams:
            self.bag = nn.EmbeddingBag(BAG_BUCKETS, len(classes), mode="sum")
            nn.init.zeros_(self.bag.weight)
            self.register_buffer("idf", torch.ones(BAG_BUCKETS))
            self.register_buffer("bag_share", torch.tensor(0.5))

    def spec(self) -> dict:
        return {"type": "classifier", "classes": self.classes, "dropout": self.dropout.p, "ngrams": self.ngrams,
                "char_ngrams": self.char_ngrams}

    def set_idf(self, documents: list[np.ndarray]) -> None:
        """Inverse document frequencies of the buckets, from the training texts' bags (bucket ids each)."""
        df = torch.zeros(BAG_BUCKETS)
        for ids in documents:
            df[torch.as_tensor(ids)] += 1
        self.idf.copy_(torch.log((1 + len(documents)) / (1 + df)) + 1)

    def tfidf(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each n-gram's weight before the text's L2 norm: log(1 + count) * idf (0 for a count of 0)."""
        return torch.log1p(counts) * self.idf[ids]

    def bag_logits(self, bag: Bag) -> torch.Tensor:
        """The bag's class logits (B, C) from flat bags (ids, offsets, counts: see bag_of_ngrams)."""
        ids, offsets, counts = (t.to(self.idf.device) for t in bag)
        weights = self.tfidf(ids, counts)
        text = torch.repeat_interleave(torch.arange(len(offsets), device=ids.device),
                                       torch.diff(offsets, append=offsets.new_tensor([len(ids)])))
        norms = torch.zeros(len(offsets), device=ids.device).index_add_(0, text, weights ** 2).sqrt()
        return self.bag(ids, offsets, per_sample_weights=weights / norms.clamp_min(1e-6)[text])

    def padded_bag_logits(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """bag_logits on right-padded bags (B, K), padding counted 0: a gather and a sum, which trace to a
        dynamic batch where EmbeddingBag's offsets do not (the ONNX export)."""
        weights = self.tfidf(ids, counts)
        weights = weights / weights.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-6)
        return (weights.unsqueeze(-1) * self.bag.weight[ids]).sum(1)

    def parts(self, hidden: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor,
              bag: Bag | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The recurrent part's class logits (B, C) from hidden (B, T, D), final states (B, D) and lengths (B,);
        and the bag's from the texts' bags (None without bags)."""
        mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :]
                < lengths.to(hidden.device)[:, None]).unsqueeze(-1)  # (B, T, 1): True on real tokens
        hidden = hidden.float()
        mean = (hidden * mask).sum(1) / lengths.to(hidden.device)[:, None].float()
        peak = hidden.masked_fill(~mask, float("-inf")).amax(1)
        logits = self.proj(self.dropout(torch.cat([last.float(), mean, peak], dim=-1)))
        return logits, self.bag_logits(bag) if self.ngrams and bag is not None else None

    def mix(self, recurrent: torch.Tensor, bag: torch.Tensor | None, share: float | None = None) -> torch.Tensor:
        """The class scores of the two parts: their log-probabilities mixed with ``share`` (default: the chosen
        one) for the bag; the recurrent logits as they are without a bag."""
        if bag is None:
            if self.ngrams:
                raise ValueError("this classifier reads the texts' bags of n-grams: pass them")
            return recurrent
        share = float(self.bag_share) if share is None else share
        return (1 - share) * F.log_softmax(recurrent, -1) + share * F.log_softmax(bag, -1)

    def forward(self, hidden: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor,
                bag: Bag | None = None) -> torch.Tensor:
        """Class scores (B, C): logits, or with a bag log-probabilities (see ``mix``)."""
        return self.mix(*self.parts(hidden, last, lengths, bag))


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

    def classify(self, tokens: torch.Tensor, lengths: torch.Tensor, bag: Bag | None = None) -> torch.Tensor:
        """Class scores (B, C) for right-padded token sequences (and their bags of n-grams, if the head reads them)."""
        parts = self.classify_parts(tokens, lengths, bag)
        return self.classifier.mix(*parts)  # type: ignore[union-attr]

    def classify_parts(self, tokens: torch.Tensor, lengths: torch.Tensor,
                       bag: Bag | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class logits of the recurrent part and of the bag of n-grams (None without), unmixed."""
        if self.classifier is None:
            raise CheckpointError("this model has no classification head; train one with `rnngen classify train`")
        hidden, last = self.encoder.forward_padded(tokens, lengths)
        return self.classifier.parts(hidden, last, lengths, bag)

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
            model.heads[name] = ClassifierHead(model.encoder.output_size, spec["classes"], spec.get("dropout", 0.2),
                                               spec.get("ngrams", 0), spec.get("char_ngrams", 0))
            continue
        raise CheckpointError(f"the checkpoint has a head {name!r} of type {spec.get('type')!r} that this "
                              "rnngen does not know; upgrade rnngen")
