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
for the first ``keep_chars`` characters (what a report shows). The text is read window by window, with its
tokens, features and per-character loss in temporary files, so memory stays flat however long it is (see
``analyse``). Library code: nothing here prints.
"""

from __future__ import annotations

import heapq
import inspect as _pyinspect
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
_INDENT = re.compile(r"^[ \t]*", re.MULTILINE)
QuoteState = tuple[str, int, int]  # the open quote, the bracket depth, characters a quote or escape took ahead


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _quotes_and_brackets(text: str, start: int, stop: int,
                         state: QuoteState = ("", 0, 0)) -> tuple[np.ndarray, np.ndarray, QuoteState]:
    """``inside_quotes`` (0/1) and ``bracket_depth`` of ``text[start:stop]``: one scan over the special characters,
    from ``state`` (what the text before left open); the characters around are context. Also the state after."""
    quote, depth, skip = state
    n = stop - start
    quote_delta = np.zeros(n + 1, dtype=np.int32)
    depth_delta = np.zeros(n + 1, dtype=np.int32)
    quote_delta[0], depth_delta[0] = bool(quote), depth
    end = start + skip
    for m in _SPECIAL.finditer(text, start + skip):
        tok, at = m.group(), m.start()
        if at >= stop:
            break
        end, i = m.end(), at - start
        if tok[0] == "\\":
            continue  # an escaped character is neither a quote nor a bracket
        if quote:
            if tok == quote or (len(quote) == 1 and tok[0] == quote):  # '""' after '"' is an empty string
                quote_delta[i] -= 1  # the closing quote is already outside
                quote = ""
            elif tok == "\n" and len(quote) == 1:
                quote_delta[i] -= 1  # a one-quote string ends with its line
                quote = ""
            continue
        if tok in ('"""', "'''", '"') or (tok == "'" and not (0 < at < len(text) - 1 and text[at - 1].isalnum()
                                                              and text[at + 1].isalnum())):
            quote = tok
            quote_delta[i] += 1
        elif tok in _OPEN:
            depth += 1
            depth_delta[i] += 1
        elif tok in _CLOSE and depth > 0:
            depth -= 1
            depth_delta[i] -= 1
    return np.cumsum(quote_delta[:n]), np.cumsum(depth_delta[:n]), (quote, depth, max(0, end - stop))


class FeatureStream:
    """The features of a text read window by window, equal to those of the whole text at once.

    What crosses a window's end is carried: the open quote and the bracket depth, the line so far (its
    length and indent), the characters just before (word starts, apostrophes, regex look-behind) and how
    far regex matches reached. Each window comes with the text after it up to its line's end (see
    ``_windows``): where that line ends, and what a quote or a regex match begun in the window reads on.
    """

    CONTEXT = 256  # characters kept from before a window: the look-behind of \b, (?<=...) and apostrophes

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        self.names = [*BUILTIN_FEATURES, *(extra or {})]
        self.patterns = [re.compile(p) for p in (extra or {}).values()]
        self.quotes: QuoteState = ("", 0, 0)
        self.line_pos, self.indent = 0, 0  # characters of the current line before the window, and its indent
        self.before = ""
        self.reach = [0] * len(self.patterns)  # characters of the window earlier matches of each regex cover

    def feed(self, window: str, ahead: str = "") -> np.ndarray:
        """The features of ``window``, (features, len(window)) int16; ``ahead`` is the text after it."""
        n, body, prev = len(window), window + ahead, self.before[-1:]
        idx = np.arange(n)
        newlines = np.flatnonzero(_codepoints(body) == 10)
        line = np.searchsorted(newlines, idx, side="left")  # a newline belongs to the line it ends
        # A line end beyond `ahead` is LOOKAHEAD or more characters away: past the int16 clip, as the true one.
        line_end = np.append(newlines, len(body))[line]
        indents = np.array([len(m.group()) for m in _INDENT.finditer(body)], dtype=np.int64)
        if self.line_pos:
            indents[0] = self.indent  # the line began in an earlier window
        inside, depth, self.quotes = _quotes_and_brackets(prev + body, len(prev), len(prev) + n, self.quotes)
        values = {
            "inside_quotes": inside,
            "bracket_depth": depth,
            "line_position": idx - np.append(-self.line_pos, newlines + 1)[line],
            "to_line_end": line_end - idx,
            "indent": indents[line],
            "word_start": _word_starts(prev + window)[len(prev):],
            "upper_case": np.fromiter(map(str.isupper, window), dtype=bool, count=n),
            "digit": np.fromiter(map(str.isdigit, window), dtype=bool, count=n),
        }
        text = self.before + body
        for k, name in enumerate(self.names[len(BUILTIN_FEATURES):]):
            values[name] = self._covered(k, text, len(self.before), len(self.before) + n)
        last_newline = window.rfind("\n")
        self.line_pos = self.line_pos + n if last_newline < 0 else n - last_newline - 1
        self.indent = int(indents[np.searchsorted(newlines, n)])  # of the line that goes on into the next window
        self.before = (self.before + window)[-self.CONTEXT:]
        # int16 (positions clipped at 32,767): the features are the largest per-character data written.
        return np.stack([np.clip(np.asarray(v, dtype=np.int64), -32768, 32767).astype(np.int16)
                         for v in values.values()])

    def _covered(self, k: int, text: str, start: int, stop: int) -> np.ndarray:
        """1 where a character of ``text[start:stop]`` is covered by a match of regex ``k``, else 0. Matches are
        searched from where the last one ended, as ``re.finditer`` does; one that would reach beyond ``text`` is
        cut at its end (a match longer than the rest of its line, after a window: rare)."""
        delta = np.zeros(stop - start + 1, dtype=np.int32)
        reach = self.reach[k]
        delta[0] += 1
        delta[min(reach, stop - start)] -= 1
        end = start + reach
        for m in self.patterns[k].finditer(text, start + reach):
            if m.start() >= stop:
                break
            delta[m.start() - start] += 1
            delta[min(m.end(), stop) - start] -= 1
            end = max(end, m.end())
        self.reach[k] = max(0, end - stop)
        return np.cumsum(delta[:-1]) > 0


def compute_features(text: str, extra: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """The feature names and their values per character, (features, len(text)) int16."""
    stream = FeatureStream(extra)
    return stream.names, stream.feed(text)


def _word_starts(text: str) -> np.ndarray:
    out = np.zeros(len(text), dtype=bool)
    out[[m.start() for m in re.finditer(r"\w+", text)]] = True
    return out


# ----------------------------------------------------------------------------------------------- reading
WINDOW = 1 << 16  # characters read at a time: memory stays flat however long the text
LOOKAHEAD = 1 << 15  # characters read past a window to find its last line's end: int16 features clip there
LONGEST_LINE = 1 << 20  # a window that ends after a newline reaches this far for one, then is cut anyway
Source = Callable[[], Iterable[str]]  # reads a text from its start, in chunks (called once per pass)


def _windows(chunks: Iterable[str], size: int, at_newline: bool) -> Iterator[tuple[str, str]]:
    """Cut a stream of text chunks into windows of ``size`` characters, each with the text after it up to one
    character past the next newline (at most LOOKAHEAD characters). With ``at_newline`` a window ends after
    a newline, reaching up to LONGEST_LINE characters for a long line, and is cut there after all."""
    buf, pos, longest = "", 0, max(size, LONGEST_LINE) if at_newline else size
    chunks, more = iter(chunks), True
    while True:
        while more and len(buf) - pos < longest + LOOKAHEAD:
            chunk = next(chunks, None)
            more = chunk is not None
            buf, pos = buf[pos:] + (chunk or ""), 0
        if pos >= len(buf):
            return
        end = min(pos + size, len(buf))
        if at_newline and end < len(buf):
            end = (buf.rfind("\n", pos, end) + 1 or buf.find("\n", end, pos + longest) + 1
                   or min(pos + longest, len(buf)))
        newline = buf.find("\n", end, end + LOOKAHEAD)
        # One character past the newline: a regex's `$` then meets no false end of the text there.
        yield buf[pos:end], buf[end: newline + 2 if newline >= 0 else end + LOOKAHEAD]
        pos = end


class _Spill:
    """Rows of numbers in a temporary file: appended or written at a row, read back by row ranges. Not
    memory-mapped: what was read does not stay in the process's memory."""

    def __init__(self, dtype: Any, width: int = 1) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (open while the spill lives, deleted when it is closed)
        self.dtype, self.width, self.rows = np.dtype(dtype), width, 0

    def __len__(self) -> int:
        return self.rows

    def write(self, at: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        self.file.seek(at * self.dtype.itemsize * self.width)
        self.file.write(data)
        self.rows = max(self.rows, at + len(data) // (self.dtype.itemsize * self.width))

    def append(self, rows: np.ndarray) -> None:
        self.write(self.rows, rows)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.rows)
        row_bytes = self.dtype.itemsize * self.width
        self.file.seek(start * row_bytes)
        data = np.frombuffer(self.file.read(max(0, stop - start) * row_bytes), dtype=self.dtype)
        return data.reshape(-1, self.width) if self.width > 1 else data


@dataclass
class _Read:
    """A text after the first pass: its tokens and features in temporary files, per-character nats to be filled
    in, and the beginning that a report shows (the characters of the tokens that start before ``keep_chars``)."""

    tokens: _Spill
    features: _Spill | None
    nats: _Spill
    head: str
    kept_tokens: int


def _first_pass(source: Source, tokenizer: Tokenizer, lengths: np.ndarray, stream: FeatureStream | None,
                keep_chars: int, window: int) -> _Read:
    """Read the text window by window: its tokens and (with a ``stream``) features into temporary files."""
    from .data import token_dtype

    read = _Read(_Spill(token_dtype(tokenizer.vocab_size)), _Spill(np.int16, len(stream.names)) if stream else None,
                 _Spill(np.float64), "", 0)
    head: list[str] = []
    chars = head_end = 0
    # Subword pieces never span a newline (the tokenizer encodes line by line), so windows cut after one are
    # encoded as the whole text is (but for a line over LONGEST_LINE characters, where a piece may be split, as
    # in the training cache); characters are tokens one by one, so any cut will do.
    for text, ahead in _windows(source(), window, at_newline=tokenizer.kind != "char"):
        ids = tokenizer.encode(text)
        tok_len = lengths[ids]
        if tok_len.sum() != len(text):
            raise InputError("the tokenizer does not spell this text character by character; report it, with the file")
        if chars < keep_chars:
            starts = chars + np.cumsum(tok_len) - tok_len
            kept = starts < keep_chars
            read.kept_tokens += int(kept.sum())
            head_end = max(head_end, int((starts + tok_len)[kept].max(initial=0)))
            head.append(text)
        read.tokens.append(ids)
        if stream is not None and read.features is not None:
            read.features.append(stream.feed(text, ahead).T)
        read.nats.append(np.full(len(text), np.nan))
        chars += len(text)
    read.head = "".join(head)[:head_end]
    return read


def _lane_chars(tokens: _Spill, lengths: np.ndarray, at_tokens: list[int]) -> list[int]:
    """The character offsets of the tokens at ``at_tokens`` (ascending), read through the token file once."""
    out, chars, done = [], 0, 0
    for p in at_tokens:
        while done < p:
            stop = min(p, done + (1 << 20))
            chars += int(lengths[tokens[done:stop]].sum())
            done = stop
        out.append(chars)
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

    ``per_char`` holds nats for each kept character (NaN where nothing was scored: the first token of the
    text, read without a prediction, and the few last tokens ``rnngen eval`` also leaves out). A subword
    token's loss is shared evenly by its characters; a byte piece that continues a character adds its loss
    to that character. Per-character data (nats, predictions, the text) is kept for the first ``len(text)``
    characters only; the summary and the spans are of the whole text.
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


def _surprising_spans(pieces: Iterable[tuple[str, np.ndarray]], count: int, width: int) -> list[dict[str, Any]]:
    """The ``count`` non-overlapping runs of ``width`` characters with the most surprisal, most first, from the
    text and its nats given piece by piece. Picking greedily, each run taken rules out fewer than 2 * ``width``
    others, so the runs picked from all of them are among the best 2 * ``count`` * ``width``: only those are kept."""
    if count <= 0:
        return []
    best: list[tuple[float, int, int, str]] = []  # a min-heap of (nats, -start, line, text): ties go to the first
    keep = 2 * count * width
    text, nats, start, lines = "", np.zeros(0), 0, 0  # the last width - 1 characters, where they start, lines before
    for piece, piece_nats in pieces:
        text, nats = text + piece, np.concatenate([nats, np.nan_to_num(piece_nats, nan=0.0)])
        n = len(nats) - width + 1
        if n > 0:
            sums = np.zeros(n)
            for k in range(width):  # added in the same order however the text is cut: equal runs stay equal
                sums += nats[k: k + n]
            newlines = np.concatenate([[0], np.cumsum(_codepoints(text) == 10)])
            for s in np.lexsort((np.arange(n), -sums))[:keep]:
                item = (float(sums[s]), -(start + int(s)), lines + int(newlines[s]) + 1, text[s: s + width])
                (heapq.heappush if len(best) < keep else heapq.heappushpop)(best, item)
        cut = max(0, len(text) - width + 1)
        lines += text.count("\n", 0, cut)
        text, nats, start = text[cut:], nats[cut:], start + cut
    spans: list[dict[str, Any]] = []
    for total, neg_start, line, run in sorted(best, reverse=True):
        if any(abs(-neg_start - s["start"]) < width for s in spans):
            continue  # overlaps a run taken
        spans.append({"start": -neg_start, "end": -neg_start + width, "line": line, "text": run,
                      "bits_per_char": round(total / width / LN2, 4)})
        if len(spans) == count:
            break
    return spans


def _nats(nats: _Spill, extra: dict[int, float], start: int, stop: int) -> np.ndarray:
    """The nats of characters ``start:stop`` (NaN where nothing was scored), with the byte pieces' ``extra``."""
    values = nats[start:stop].copy()
    for at in (at for at in extra if start <= at < stop):
        values[at - start] = np.nan_to_num(values[at - start]) + extra[at]
    return values


def _scored_pieces(source: Source, nats: _Spill, extra: dict[int, float],
                   window: int) -> Iterator[tuple[str, np.ndarray]]:
    """The text read again window by window, each with the nats of its characters."""
    at = 0
    for text, _ in _windows(source(), window, at_newline=False):
        yield text, _nats(nats, extra, at, at + len(text))
        at += len(text)


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
def analyse(model: RNNModel, tokenizer: Tokenizer, text: str | Source, *, cells: bool = True,
            features: dict[str, str] | None = None, keep_chars: int = 5000, top_k: int = 5,
            spans: int = 5, span_chars: int = 20, window: int = WINDOW) -> Surprisal | Inspection:
    """Score ``text`` (a string, or a function that reads it in chunks) as ``rnngen eval`` does; with ``cells``,
    also correlate every unit with the features and count gate saturation (then the encoder is stepped by hand,
    else the model runs as it is).

    Memory stays flat however long the text: a first pass reads it ``window`` characters at a time into
    temporary files (tokens, features); the model then reads eval's parallel lanes from them, keeping running
    sums, and writes each character's loss to another; a last pass reads the text again for the spans."""
    from .data import eval_windows

    config = model.config
    if config.bidirectional:
        step_layers(model, torch.zeros(1, 1, dtype=torch.long))  # raises the one-line message
    device = next(model.parameters()).device
    lengths = np.zeros(config.vocab_size, dtype=np.int64)
    lengths[: tokenizer.vocab_size] = tokenizer.char_lengths()
    source: Source = (lambda: (text,)) if isinstance(text, str) else text
    stream = FeatureStream(features) if cells else None
    read = _first_pass(source, tokenizer, lengths, stream, keep_chars, window)
    tokens, n_keep_tok = read.tokens, read.kept_tokens
    if len(tokens) < 2:
        raise InputError("the text is too short to inspect; give it at least two characters")
    top_ids = np.full((n_keep_tok, top_k), -1, dtype=np.int64)
    top_probs = np.zeros((n_keep_tok, top_k), dtype=np.float32)
    text_vocab = config.text_vocab_size
    feat_names = stream.names if stream else []
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
    extra: dict[int, float] = {}  # byte pieces' nats for a character of a chunk written before or after
    seq_len = _eval_seq_len()
    # The lanes of `rnngen eval`, each from a fresh state at its own place in the text; each lane's next character.
    # (eval_windows only takes len() and slices: a range of positions or a _Spill of tokens will do.)
    first = next(iter(eval_windows(range(len(tokens)), seq_len)))[0]  # type: ignore[arg-type]
    lane_starts = _lane_chars(tokens, lengths, first[:, 0].tolist())
    char_at = np.array(lane_starts, dtype=np.int64)
    state: State | None = None
    with _threads_for_steps(model, device):
        # The windows of `rnngen eval`, read twice: the tokens, and their positions (the same layout).
        for (x, y), (px, _) in zip(eval_windows(tokens, seq_len),  # type: ignore[arg-type]
                                   eval_windows(range(len(tokens)), seq_len)):  # type: ignore[arg-type]
            pos_in = px.numpy()
            pos_out = pos_in + 1
            w_in, w_out = lengths[x.numpy()], lengths[y.numpy()]
            x, y = x.to(device), y.to(device)
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
            total_chars += int(w_out.sum())
            _spread(read.nats, extra, nll.cpu().numpy(), w_out, char_at + w_in[:, 0])
            keep = pos_out < n_keep_tok
            if keep.any():
                n_top = min(top_k, text_vocab)
                probs, ids = logp[torch.from_numpy(keep).to(device)][:, :text_vocab].topk(n_top, -1)
                top_ids[pos_out[keep], :n_top] = ids.cpu().numpy()
                top_probs[pos_out[keep], :n_top] = probs.exp().cpu().numpy()
            lane_chars = w_in.sum(1)
            if cells and read.features is not None:
                steps += x.numel()
                acts = torch.cat([t for tr in traces for t in ((tr.c, tr.h) if tr.c is not None else (tr.h,))], -1)
                feats = [read.features[a: a + c].T for a, c in zip(char_at, lane_chars)]
                _accumulate(sums, acts.double().flatten(0, 1).cpu().numpy(), w_in, feats)
                keep_in = pos_in < n_keep_tok
                if keep_in.any():
                    kept_act[pos_in[keep_in]] = acts.cpu().numpy()[keep_in].reshape(-1, ng, units)
                for k, tr in enumerate(traces):
                    for name, gate in tr.gates.items():
                        gate_counts[k][name]["left"] += (gate < LEFT).sum((0, 1))
                        gate_counts[k][name]["right"] += (gate > RIGHT).sum((0, 1))
            char_at += lane_chars
    per_token = total_nats / total_tokens
    nats_per_char = total_nats / max(1, total_chars)
    summary = {"loss": per_token, "nats_per_char": nats_per_char, "bits_per_char": nats_per_char / LN2,
               "perplexity": math.exp(min(per_token, 50.0)), "tokens": total_tokens, "chars": total_chars}
    result = Surprisal(
        summary, _nats(read.nats, extra, 0, len(read.head)), read.head,
        np.repeat(np.arange(n_keep_tok), lengths[tokens[:n_keep_tok]]), top_ids, top_probs,
        vocabulary_strings(tokenizer), lane_starts,
        _surprising_spans(_scored_pieces(source, read.nats, extra, window), spans, span_chars))
    if not cells:
        return result
    return Inspection(
        config.arch, config.layers, units, tokenizer.kind, result, feat_names,
        {name: BUILTIN_FEATURES.get(name, f"covered by a match of {(features or {}).get(name)!r}")
         for name in feat_names},
        groups, _pearson(sums).reshape(ng, units, nf), kept_act,
        [{g: {side: (v / max(1, steps)).cpu().numpy() for side, v in sides.items()} for g, sides in layer.items()}
         for layer in gate_counts], steps)


def _spread(nats: _Spill, extra: dict[int, float], nll: np.ndarray, w_out: np.ndarray, firsts: np.ndarray) -> None:
    """Give each scored token's loss to its characters (each lane's, from ``firsts``): shared evenly, or, for a
    byte piece that continues a character (no characters of its own), added to the character before it."""
    for lane_nll, counts, first in zip(nll, w_out, firsts):
        values = np.repeat(lane_nll / np.maximum(counts, 1), counts)
        for at, value in zip((np.cumsum(counts) - counts)[counts == 0], lane_nll[counts == 0]):
            if at > 0:
                values[at - 1] += value
            elif first > 0:  # the character is another chunk's, maybe written after this one: added at the end
                extra[int(first) - 1] = extra.get(int(first) - 1, 0.0) + float(value)
        nats.write(int(first), values)


def _accumulate(sums: dict[str, Any], acts: np.ndarray, w_in: np.ndarray, feats: list[np.ndarray]) -> None:
    """Add one window to the running sums of the correlations. Each character counts once, with the state
    after the model read its token; a token of several characters sums their features. ``w_in``: characters
    of each input token (lanes, T); ``feats``: each lane's features of those characters (features, chars)."""
    token_feats = []
    for lane_feats, counts in zip(feats, w_in):
        x = lane_feats.astype(np.float64)
        sums["n"] += x.shape[1]
        sums["x"] += x.sum(1)
        sums["xx"] += (x * x).sum(1)
        cum = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x, 1)], 1)
        ends = np.cumsum(counts)
        token_feats.append((cum[:, ends] - cum[:, ends - counts]).T)
    s = np.concatenate(token_feats)  # (tokens, features): summed over each token's characters
    w = w_in.reshape(-1).astype(np.float64)  # characters per token
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


# ----------------------------------------------------------------------------------------------- entry points
def surprisal(model: RNNModel, tokenizer: Tokenizer, text: str | Source, *, keep_chars: int = 5000, top_k: int = 5,
              spans: int = 5, span_chars: int = 20, window: int = WINDOW) -> Surprisal:
    """The per-character loss of ``text`` and the model's top predictions (plain data, e.g. for a server)."""
    result = analyse(model, tokenizer, text, cells=False, keep_chars=keep_chars, top_k=top_k, spans=spans,
                     span_chars=span_chars, window=window)
    assert isinstance(result, Surprisal)
    return result


def inspect_text(model: RNNModel, tokenizer: Tokenizer, text: str | Source, *,
                 features: dict[str, str] | None = None, keep_chars: int = 5000, top_k: int = 5, spans: int = 5,
                 span_chars: int = 20, window: int = WINDOW) -> Inspection:
    """Surprisal, cell correlations with the features (built-in plus ``features``: name -> regex) and gates."""
    result = analyse(model, tokenizer, text, cells=True, features=features, keep_chars=keep_chars, top_k=top_k,
                     spans=spans, span_chars=span_chars, window=window)
    assert isinstance(result, Inspection)
    return result


def inspect_checkpoint(checkpoint: str | Path, file: str | Path, *, device: str = "cpu", encoding: str = "utf-8",
                       errors: str = "strict", **options: Any) -> Inspection:
    """Load ``checkpoint`` and inspect ``file``, read as ``rnngen eval`` reads it but in chunks (twice), never
    whole (options: ``inspect_text``'s)."""
    from .checkpoint import load_checkpoint
    from .corpora import resolve_corpus
    from .runtime import resolve_device

    corpus = resolve_corpus([str(file)], encoding, errors)
    model, tokenizer, _, _ = load_checkpoint(checkpoint, resolve_device(device))
    return inspect_text(model, tokenizer, corpus.chunks, **options)
