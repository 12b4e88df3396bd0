"""Looking inside a trained model: surprisal per character, interpretable cells and gate saturation.

Following Karpathy, Johnson and Fei-Fei (2015), "Visualizing and Understanding Recurrent Networks":

- **Surprisal**: the loss of each character of a text, with the model's top predictions for it, scored
  exactly as ``rnngen eval`` scores (the same windows and parallel lanes, each lane from a fresh state),
  so the per-character numbers add up to its loss.
- **Cells**: the Pearson correlation of every unit (LSTM cell state ``c`` and hidden state ``h`` of each
  layer) with simple features of the text (inside quotes, bracket depth, ...) and the user's regexes.
- **Gates**: per layer and unit, the share of steps each gate is left-saturated (< 0.1) or
  right-saturated (> 0.9).

The encoder is run layer by layer from the ``nn.LSTM/GRU/RNN`` weights (PyTorch's gate order) so that
gates and cell states are seen; only running sums are kept for the whole text, plus per-character data
for the first ``keep_chars`` characters (what a report shows). Library code: nothing here prints.
"""

from __future__ import annotations

import inspect as _pyinspect
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .model import RNNModel, State
from .tokenizers import Tokenizer

LN2 = math.log(2.0)
LEFT, RIGHT = 0.1, 0.9  # gate saturation thresholds (the paper's)
GATES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update"), "rnn": ()}

BUILTIN_FEATURES = {
    "inside_quotes": "inside a '...', \"...\" or triple-quoted string: from the opening quote to the closing "
                     "one (excluded); one-quote strings end at the line's end, an apostrophe between letters "
                     "opens none",
    "bracket_depth": "(), [] and {} open after this character, outside quotes",
    "line_position": "characters before this one on its line",
    "to_line_end": "characters from this one to the line's end (0 on the newline)",
    "indent": "leading spaces and tabs of the line",
    "word_start": "first character of a word (letters, digits, _)",
    "upper_case": "an upper-case letter",
    "digit": "a digit",
}


def _eval_seq_len() -> int:
    """The window length ``rnngen eval`` reads with (runtime.evaluate's default), so scores match it."""
    from .runtime import evaluate

    return int(_pyinspect.signature(evaluate).parameters["seq_len"].default)


# ----------------------------------------------------------------------------------------------- features
def parse_feature(spec: str) -> tuple[str, str]:
    """``NAME=REGEX`` -> (name, regex); a bad spec or regex is an InputError."""
    name, sep, pattern = spec.partition("=")
    name = name.strip()
    if not sep or not name or not pattern:
        raise InputError(f"--feature {spec!r}: write it as NAME=REGEX, e.g. --feature 'keyword=\\b(def|class)\\b'")
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise InputError(f"--feature {spec!r}: the name must be letters, digits, _ or -, starting with a letter")
    if name in BUILTIN_FEATURES:
        raise InputError(f"--feature {name!r} is a built-in feature already; pick another name")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--feature {name}: the regex {pattern!r} is invalid ({exc}); fix it") from None
    return name, pattern


_SPECIAL = re.compile(r'"""|\'\'\'|\\.|["\'\n()\[\]{}]', re.DOTALL)
_OPEN, _CLOSE = "([{", ")]}"


def _quotes_and_brackets(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``inside_quotes`` (0/1) and ``bracket_depth`` for each character: one scan over the special characters."""
    n = len(text)
    quote_delta = np.zeros(n + 1, dtype=np.int32)
    depth_delta = np.zeros(n + 1, dtype=np.int32)
    quote, depth = "", 0
    for m in _SPECIAL.finditer(text):
        tok, at = m.group(), m.start()
        if tok[0] == "\\":
            continue  # an escaped character is neither a quote nor a bracket
        if quote:
            if tok == quote or (len(quote) == 1 and tok[0] == quote):  # '""' after '"' is an empty string
                quote_delta[at] -= 1  # the closing quote is already outside
                quote = ""
            elif tok == "\n" and len(quote) == 1:
                quote_delta[at] -= 1  # a one-quote string ends with its line
                quote = ""
            continue
        if tok in ('"""', "'''", '"') or (tok == "'" and not (0 < at < n - 1 and text[at - 1].isalnum()
                                                              and text[at + 1].isalnum())):
            quote = tok
            quote_delta[at] += 1
        elif tok in _OPEN:
            depth += 1
            depth_delta[at] += 1
        elif tok in _CLOSE and depth > 0:
            depth -= 1
            depth_delta[at] -= 1
    return np.cumsum(quote_delta[:n]), np.cumsum(depth_delta[:n])


def _covered(text: str, pattern: str, flags: int = 0) -> np.ndarray:
    """1 where a character is covered by a match of ``pattern``, else 0."""
    delta = np.zeros(len(text) + 1, dtype=np.int32)
    for m in re.finditer(pattern, text, flags):
        delta[m.start()] += 1
        delta[m.end()] -= 1
    return np.cumsum(delta[:-1]) > 0


def compute_features(text: str, extra: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """The feature names and their values per character, (features, len(text)) int16."""
    n = len(text)
    idx = np.arange(n)
    chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    newlines = np.flatnonzero(chars == 10)
    line = np.searchsorted(newlines, idx, side="left")  # a newline belongs to the line it ends
    line_start = np.append(0, newlines + 1)[line]
    line_end = np.append(newlines, n)[line]
    indents = np.array([len(m.group()) for m in re.finditer(r"^[ \t]*", text, re.MULTILINE)], dtype=np.int64)
    inside, depth = _quotes_and_brackets(text)
    values = {
        "inside_quotes": inside,
        "bracket_depth": depth,
        "line_position": idx - line_start,
        "to_line_end": line_end - idx,
        "indent": indents[line] if len(indents) else np.zeros(n),
        "word_start": _word_starts(text),
        "upper_case": np.fromiter(map(str.isupper, text), dtype=bool, count=n),
        "digit": np.fromiter(map(str.isdigit, text), dtype=bool, count=n),
    }
    for name, pattern in (extra or {}).items():
        values[name] = _covered(text, pattern)
    # int16 (positions clipped at 32,767): the features are the largest per-character array kept.
    return list(values), np.stack([np.clip(np.asarray(v, dtype=np.int64), -32768, 32767).astype(np.int16)
                                     for v in values.values()])


def _word_starts(text: str) -> np.ndarray:
    out = np.zeros(len(text), dtype=bool)
    out[[m.start() for m in re.finditer(r"\w+", text)]] = True
    return out


# ----------------------------------------------------------------------------------------------- the encoder
@dataclass
class LayerTrace:
    """One layer over a window: outputs ``h`` (B, T, H), the LSTM cell state ``c`` and gate values, by name."""

    h: torch.Tensor
    c: torch.Tensor | None
    gates: dict[str, torch.Tensor]


def _layer_weights(rnn: torch.nn.RNNBase, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}")
    zeros = torch.zeros(w_ih.shape[0], device=w_ih.device, dtype=w_ih.dtype)
    b_ih, b_hh = getattr(rnn, f"bias_ih_l{k}", None), getattr(rnn, f"bias_hh_l{k}", None)
    return w_ih, w_hh, zeros if b_ih is None else b_ih, zeros if b_hh is None else b_hh


@torch.no_grad()
def step_layers(model: RNNModel, tokens: torch.Tensor, state: State | None = None) -> tuple[list[LayerTrace], State]:
    """Run the encoder layer by layer, step by step, from its weights (eval mode: no dropout).

    Same numbers as ``model.encoder(tokens, state)`` to float precision, but it also returns each layer's
    gates and LSTM cell states. PyTorch's gate order: LSTM i, f, g, o; GRU r, z, n.
    """
    config, rnn = model.config, model.encoder.rnn
    if config.bidirectional:
        raise InputError("this checkpoint has a bidirectional encoder: it is not a language model, so there is "
                         "nothing to inspect; use a unidirectional model")
    state = state if state is not None else model.encoder.initial_state(tokens.shape[0], tokens.device)
    x = model.encoder.embedding(tokens)
    traces: list[LayerTrace] = []
    h_out: list[torch.Tensor] = []
    c_out: list[torch.Tensor] = []
    for k in range(config.layers):
        w_ih, w_hh, b_ih, b_hh = _layer_weights(rnn, k)
        h = state[0][k]
        c = state[1][k] if config.arch == "lstm" else None
        inputs = F.linear(x, w_ih, b_ih)  # (B, T, G*H) for the whole window at once: only h @ W_hh is sequential
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        gates: dict[str, list[torch.Tensor]] = {name: [] for name in GATES[config.arch]}
        for t in range(tokens.shape[1]):
            rec = F.linear(h, w_hh, b_hh)
            if c is not None:  # LSTM
                i, f, g, o = (inputs[:, t] + rec).chunk(4, dim=-1)
                i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
                c = f * c + i * torch.tanh(g)
                h = o * torch.tanh(c)
                cs.append(c)
                for name, gate in zip(("input", "forget", "output"), (i, f, o)):
                    gates[name].append(gate)
            elif config.arch == "gru":
                ir, iz, in_ = inputs[:, t].chunk(3, dim=-1)
                hr, hz, hn = rec.chunk(3, dim=-1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
                gates["reset"].append(r)
                gates["update"].append(z)
            else:
                act = torch.relu if getattr(rnn, "nonlinearity", "tanh") == "relu" else torch.tanh
                h = act(inputs[:, t] + rec)
            hs.append(h)
        traces.append(LayerTrace(torch.stack(hs, 1), torch.stack(cs, 1) if cs else None,
                                 {name: torch.stack(v, 1) for name, v in gates.items()}))
        h_out.append(h)
        if c is not None:
            c_out.append(c)
        x = traces[-1].h
    new_state = (torch.stack(h_out), torch.stack(c_out)) if c_out else (torch.stack(h_out),)
    return traces, new_state


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Surprisal:
    """The loss of a text character by character, scored as ``rnngen eval`` scores it.

    ``per_char`` holds nats for every character of the text (NaN where nothing was scored: the first
    token of the text, read without a prediction, and the few last tokens ``rnngen eval`` also leaves
    out). A subword token's loss is shared evenly by its characters; a byte piece that continues a
    character adds its loss to that character. Predictions and the text are kept for the first
    ``len(text)`` characters only.
    """

    summary: dict[str, float]
    per_char: np.ndarray
    text: str  # the kept beginning of the text
    token_of_char: np.ndarray  # for each kept character, the index of its token
    top_ids: np.ndarray  # (kept tokens, k): the model's most likely tokens for each kept token, -1 if unscored
    top_probs: np.ndarray
    vocabulary: list[str]  # how each token id reads
    lane_starts: list[int]  # characters where a fresh state begins (eval's parallel lanes)
    spans: list[dict[str, Any]] = field(default_factory=list)

    def predictions(self, char: int) -> list[tuple[str, float]]:
        """What the model predicted for the (kept) character ``char``: (token text, probability), best first."""
        return self.predictions_of_token(int(self.token_of_char[char]))

    def predictions_of_token(self, token: int) -> list[tuple[str, float]]:
        """What the model predicted for the kept token at ``token`` (none for the text's first token)."""
        return [(self.vocabulary[int(i)], float(p))
                for i, p in zip(self.top_ids[token], self.top_probs[token]) if i >= 0]

    def characters(self) -> list[dict[str, Any]]:
        """Each kept character with its surprisal in bits (None if not scored) and the model's predictions for it
        (what a playground shows on hover)."""
        return [{"char": char, "bits": None if math.isnan(nats) else nats / LN2, "predictions": self.predictions(i)}
                for i, (char, nats) in enumerate(zip(self.text, self.per_char))]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "surprising_spans": self.spans, "lane_starts": self.lane_starts}


@dataclass(frozen=True)
class Cell:
    """A unit of the network: ``layer`` from 1, ``kind`` "c" (LSTM cell state) or "h" (hidden state)."""

    layer: int
    kind: str
    unit: int

    @property
    def name(self) -> str:
        return f"L{self.layer} {self.kind}[{self.unit}]"


@dataclass
class Inspection:
    """Everything ``rnngen inspect`` reports on a text under a model."""

    arch: str
    layers: int
    hidden: int
    tokenizer: str
    surprisal: Surprisal
    features: list[str]
    descriptions: dict[str, str]
    groups: list[tuple[int, str]]  # (layer, kind) of each block of ``hidden`` units
    correlations: np.ndarray  # (groups, hidden, features); NaN where a feature or unit is constant
    kept_activations: np.ndarray  # (kept tokens, groups, hidden) float16
    gates: list[dict[str, dict[str, np.ndarray]]]  # per layer: gate -> {"left": (H,), "right": (H,)}
    steps: int  # time steps the gate shares count

    def correlation(self, cell: Cell, feature: str) -> float:
        g = self.groups.index((cell.layer, cell.kind))
        return float(self.correlations[g, cell.unit, self.features.index(feature)])

    def strongest(self, feature: str, top: int = 3, layer: int | None = None) -> list[tuple[Cell, float]]:
        """The ``top`` cells with the largest |correlation| with ``feature`` (of one ``layer``, from 1, if given)."""
        r = self.correlations[:, :, self.features.index(feature)]
        order = np.argsort(-np.nan_to_num(np.abs(r), nan=-1.0), axis=None, kind="stable")
        out = []
        for flat in order:
            g, unit = divmod(int(flat), self.hidden)
            cell_layer, kind = self.groups[g]
            if np.isnan(r[g, unit]) or (layer is not None and cell_layer != layer):
                continue
            out.append((Cell(cell_layer, kind, unit), float(r[g, unit])))
            if len(out) == top:
                break
        return out

    def activation(self, cell: Cell) -> np.ndarray:
        """The cell's value after each kept character (the state after reading its token), float32."""
        g = self.groups.index((cell.layer, cell.kind))
        return self.kept_activations[self.surprisal.token_of_char, g, cell.unit].astype(np.float32)

    def to_dict(self, top: int = 3, layer: int | None = None) -> dict[str, Any]:
        """The numbers as plain JSON-able data (what ``--json`` prints)."""
        return {
            "model": {"arch": self.arch, "layers": self.layers, "hidden": self.hidden, "tokenizer": self.tokenizer},
            **self.surprisal.to_dict(),
            "features": {name: {
                "description": self.descriptions[name],
                "cells": [{"layer": c.layer, "kind": c.kind, "unit": c.unit, "r": round(r, 4)}
                          for c, r in self.strongest(name, top, layer)]} for name in self.features},
            "gates": [{"layer": k + 1, **{gate: {
                "left_mean": round(float(v["left"].mean()), 4), "right_mean": round(float(v["right"].mean()), 4),
                "left": [round(float(x), 4) for x in v["left"]], "right": [round(float(x), 4) for x in v["right"]]}
                for gate, v in layer_gates.items()}} for k, layer_gates in enumerate(self.gates)],
            "gate_thresholds": {"left": LEFT, "right": RIGHT}, "steps": self.steps,
        }


# ----------------------------------------------------------------------------------------------- the pass
def vocabulary_strings(tokenizer: Tokenizer) -> list[str]:
    """How each token id reads (a byte piece as its name, e.g. <0xE2>)."""
    pieces = getattr(tokenizer, "pieces", None)
    if pieces is None:
        return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    return [p if tokenizer.is_byte[i] else tokenizer.decode([i])  # type: ignore[attr-defined]
            for i, p in enumerate(pieces)]


def _surprising_spans(per_char: np.ndarray, text_at: Any, newlines_before: Any, count: int,
                      width: int) -> list[dict[str, Any]]:
    """The ``count`` non-overlapping runs of ``width`` characters with the most surprisal, most first."""
    nats = np.nan_to_num(per_char, nan=0.0)
    if len(nats) < width or count <= 0:
        return []
    sums = np.convolve(nats, np.ones(width), mode="valid")
    taken = np.zeros(len(nats), dtype=bool)
    spans: list[dict[str, Any]] = []
    for start in np.argsort(-sums, kind="stable"):
        start = int(start)
        if taken[start: start + width].any():
            continue
        taken[start: start + width] = True
        spans.append({"start": start, "end": start + width, "line": newlines_before(start) + 1,
                      "text": text_at(start, start + width),
                      "bits_per_char": round(float(sums[start]) / width / LN2, 4)})
        if len(spans) == count:
            break
    return spans


@contextmanager
def _threads_for_steps(model: RNNModel, device: torch.device, batch: int = 16) -> Iterator[None]:
    """One CPU thread while stepping a small model: its per-step matmuls are tiny, and on a busy machine
    splitting each between threads made them 300x slower (2 ms instead of 7 us, 2 cores, load 4)."""
    c = model.config
    small = c.hidden * max(c.hidden, c.emb_dim) * 4 * batch <= 1 << 22
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def analyse(model: RNNModel, tokenizer: Tokenizer, text: str, *, cells: bool = True,
            features: dict[str, str] | None = None, keep_chars: int = 5000, top_k: int = 5,
            spans: int = 5, span_chars: int = 20) -> Surprisal | Inspection:
    """Score ``text`` as ``rnngen eval`` does; with ``cells``, also correlate every unit with the features
    and count gate saturation (then the encoder is stepped by hand, else the model runs as it is)."""
    from .data import eval_windows

    config = model.config
    if config.bidirectional:
        step_layers(model, torch.zeros(1, 1, dtype=torch.long))  # raises the one-line message
    device = next(model.parameters()).device
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(tokens) < 2:
        raise InputError("the text is too short to inspect; give it at least two characters")
    lengths = np.zeros(config.vocab_size, dtype=np.int64)
    lengths[: tokenizer.vocab_size] = tokenizer.char_lengths()
    tok_len = lengths[tokens]
    offsets = np.concatenate([[0], np.cumsum(tok_len)])  # token p covers characters offsets[p]:offsets[p+1]
    if offsets[-1] != len(text):
        raise InputError("the tokenizer does not spell this text character by character; report it, with the file")
    n_keep_tok = int(np.searchsorted(offsets, min(keep_chars, len(text)), side="left"))
    kept_text = text[: offsets[n_keep_tok]]
    per_char = np.full(len(text), np.nan)
    top_ids = np.full((n_keep_tok, top_k), -1, dtype=np.int64)
    top_probs = np.zeros((n_keep_tok, top_k), dtype=np.float32)
    text_vocab = config.text_vocab_size
    feat_names, feats = compute_features(text, features) if cells else ([], np.zeros((0, len(text)), np.int16))
    units = config.hidden
    groups = [(k + 1, kind) for k in range(config.layers) for kind in (("c", "h") if config.arch == "lstm" else ("h",))]
    nf, ng = len(feat_names), len(groups)
    sums = {"n": 0.0, "x": np.zeros(nf), "xx": np.zeros(nf), "a": np.zeros(ng * units),
            "aa": np.zeros(ng * units), "ax": np.zeros((ng * units, nf))}
    gate_counts = [{g: {"left": torch.zeros(units, dtype=torch.float64, device=device),
                        "right": torch.zeros(units, dtype=torch.float64, device=device)} for g in GATES[config.arch]}
                   for _ in range(config.layers)]
    kept_act = np.zeros((n_keep_tok if cells else 0, ng, units), dtype=np.float16)
    total_nats, total_chars, total_tokens, steps = 0.0, 0, 0, 0
    state: State | None = None
    with _threads_for_steps(model, device):
        # The windows of `rnngen eval`, read on the positions rather than the tokens: the same layout, known places.
        for px, _ in eval_windows(np.arange(len(tokens)), _eval_seq_len()):
            pos_in = px.numpy()
            pos_out = pos_in + 1
            x = torch.from_numpy(tokens[pos_in]).to(device)
            y = torch.from_numpy(tokens[pos_out]).to(device)
            if cells:
                traces, state = step_layers(model, x, state)
                logits = model.lm_head(traces[-1].h)
            else:
                logits, state = model(x, state)
            logits = logits.float()
            logits[..., text_vocab:] = float("-inf")  # label tokens are not text (`rnngen eval` masks them too)
            logp = torch.log_softmax(logits, -1)
            nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).double()  # (B, T)
            total_nats += float(nll.sum())
            total_tokens += y.numel()
            total_chars += int(tok_len[pos_out].sum())
            _spread(per_char, nll.cpu().numpy(), pos_out, offsets)
            keep = pos_out < n_keep_tok
            if keep.any():
                n_top = min(top_k, text_vocab)
                probs, ids = logp[torch.from_numpy(keep).to(device)][:, :text_vocab].topk(n_top, -1)
                top_ids[pos_out[keep], :n_top] = ids.cpu().numpy()
                top_probs[pos_out[keep], :n_top] = probs.exp().cpu().numpy()
            if not cells:
                continue
            steps += x.numel()
            acts = torch.cat([t for tr in traces for t in ((tr.c, tr.h) if tr.c is not None else (tr.h,))], -1)
            _accumulate(sums, acts.double().flatten(0, 1).cpu().numpy(), pos_in, offsets, feats)
            keep_in = pos_in < n_keep_tok
            if keep_in.any():
                kept_act[pos_in[keep_in]] = acts.cpu().numpy()[keep_in].reshape(-1, ng, units)
            for k, tr in enumerate(traces):
                for name, gate in tr.gates.items():
                    gate_counts[k][name]["left"] += (gate < LEFT).sum((0, 1))
                    gate_counts[k][name]["right"] += (gate > RIGHT).sum((0, 1))
    per_token = total_nats / total_tokens
    nats_per_char = total_nats / max(1, total_chars)
    summary = {"loss": per_token, "nats_per_char": nats_per_char, "bits_per_char": nats_per_char / LN2,
               "perplexity": math.exp(min(per_token, 50.0)), "tokens": total_tokens, "chars": total_chars}
    seq_lanes = _lane_starts(len(tokens), offsets)
    result = Surprisal(
        summary, per_char, kept_text, np.repeat(np.arange(n_keep_tok), tok_len[:n_keep_tok]), top_ids, top_probs,
        vocabulary_strings(tokenizer), seq_lanes,
        _surprising_spans(per_char, lambda a, b: text[a:b], lambda at: text.count("\n", 0, at), spans, span_chars))
    if not cells:
        return result
    return Inspection(
        config.arch, config.layers, units, tokenizer.kind, result, feat_names,
        {name: BUILTIN_FEATURES.get(name, f"covered by a match of {(features or {}).get(name)!r}")
         for name in feat_names},
        groups, _pearson(sums).reshape(ng, units, nf), kept_act,
        [{g: {side: (v / max(1, steps)).cpu().numpy() for side, v in sides.items()} for g, sides in layer.items()}
         for layer in gate_counts], steps)


def _spread(per_char: np.ndarray, nll: np.ndarray, pos_out: np.ndarray, offsets: np.ndarray) -> None:
    """Give each scored token's loss to its characters: shared evenly, or, for a byte piece that continues
    a character (no characters of its own), added to the character before it."""
    for lane_nll, lane_pos in zip(nll, pos_out):
        starts, ends = offsets[lane_pos], offsets[lane_pos + 1]
        counts = ends - starts
        first, last = starts[0], ends[-1]  # a lane's tokens are consecutive: so are their characters
        # Added, not assigned: a byte piece may have added to a character of another lane's token already.
        per_char[first:last] = (np.nan_to_num(per_char[first:last])
                                + np.repeat(lane_nll / np.maximum(counts, 1), counts))
        for at, value in zip(starts[counts == 0], lane_nll[counts == 0]):
            if at > 0:
                per_char[at - 1] = np.nan_to_num(per_char[at - 1]) + value


def _accumulate(sums: dict[str, Any], acts: np.ndarray, pos_in: np.ndarray, offsets: np.ndarray,
                feats: np.ndarray) -> None:
    """Add one window to the running sums of the correlations. Each character counts once, with the state
    after the model read its token; a token of several characters sums their features."""
    token_feats = []
    for lane_pos in pos_in:
        first, last = offsets[lane_pos[0]], offsets[lane_pos[-1] + 1]
        x = feats[:, first:last].astype(np.float64)
        sums["n"] += last - first
        sums["x"] += x.sum(1)
        sums["xx"] += (x * x).sum(1)
        cum = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x, 1)], 1)
        token_feats.append((cum[:, offsets[lane_pos + 1] - first] - cum[:, offsets[lane_pos] - first]).T)
    s = np.concatenate(token_feats)  # (tokens, features): summed over each token's characters
    w = (offsets[pos_in + 1] - offsets[pos_in]).reshape(-1).astype(np.float64)  # characters per token
    sums["a"] += w @ acts
    sums["aa"] += w @ (acts * acts)
    sums["ax"] += acts.T @ s


def _pearson(sums: dict[str, Any]) -> np.ndarray:
    """Pearson r of every unit with every feature from the running sums; NaN where either is constant."""
    n = sums["n"]
    cov = n * sums["ax"] - np.outer(sums["a"], sums["x"])
    var_a = np.maximum(n * sums["aa"] - sums["a"] ** 2, 0.0)
    var_x = np.maximum(n * sums["xx"] - sums["x"] ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cov / np.sqrt(np.outer(var_a, var_x)), -1.0, 1.0)
    # A variance within rounding noise of 0 is a constant (a feature absent from the text, a dead unit).
    noise = 1e-12 * n * n
    r[(var_a <= noise)[:, None] | (var_x <= noise)[None, :]] = np.nan
    return r


def _lane_starts(n_tokens: int, offsets: np.ndarray) -> list[int]:
    """Characters at which `rnngen eval`'s lanes (and so a fresh state) begin."""
    from .data import eval_windows

    first = next(iter(eval_windows(np.arange(n_tokens), _eval_seq_len())))[0][:, 0].numpy()
    return [int(offsets[p]) for p in first]


# ----------------------------------------------------------------------------------------------- entry points
def surprisal(model: RNNModel, tokenizer: Tokenizer, text: str, *, keep_chars: int = 5000, top_k: int = 5,
              spans: int = 5, span_chars: int = 20) -> Surprisal:
    """The per-character loss of ``text`` and the model's top predictions (plain data, e.g. for a server)."""
    result = analyse(model, tokenizer, text, cells=False, keep_chars=keep_chars, top_k=top_k, spans=spans,
                     span_chars=span_chars)
    assert isinstance(result, Surprisal)
    return result


def inspect_text(model: RNNModel, tokenizer: Tokenizer, text: str, *, features: dict[str, str] | None = None,
                 keep_chars: int = 5000, top_k: int = 5, spans: int = 5, span_chars: int = 20) -> Inspection:
    """Surprisal, cell correlations with the features (built-in plus ``features``: name -> regex) and gates."""
    result = analyse(model, tokenizer, text, cells=True, features=features, keep_chars=keep_chars, top_k=top_k,
                     spans=spans, span_chars=span_chars)
    assert isinstance(result, Inspection)
    return result


def inspect_checkpoint(checkpoint: str | Path, file: str | Path, *, device: str = "cpu", encoding: str = "utf-8",
                       errors: str = "strict", **options: Any) -> Inspection:
    """Load ``checkpoint``, read ``file`` as ``rnngen eval`` reads it, and inspect it (options: ``inspect_text``'s)."""
    from .checkpoint import load_checkpoint
    from .corpora import resolve_corpus
    from .runtime import resolve_device

    text = resolve_corpus([str(file)], encoding, errors).read()
    model, tokenizer, _, _ = load_checkpoint(checkpoint, resolve_device(device))
    return inspect_text(model, tokenizer, text, **options)
