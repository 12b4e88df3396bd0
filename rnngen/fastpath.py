"""One-token steps for generation, with the fewest torch operations per token.

The plain way to advance a model by one token, ``model(tokens.view(B, 1), state)``, costs far more in
Python and dispatch overhead than in arithmetic for the models rnngen trains (a 2x256 LSTM at batch 1:
about 1 ms per token on a 2-core CPU, most of it overhead). ``Stepper`` does the same arithmetic with
weights prepared once, and ``Streams`` runs it on preallocated buffers updated in place:

    tokens (B,) --table lookup--> layer-0 input gates (B, G*H)      (embedding x W_ih + biases, per token id)
    hs = [h_0 | h_1 | ... | h_{L-1}]  (B, L*H): layer l reads [h_{l-1} | h_l], a slice of hs, in one matmul
    gates reordered so one sigmoid covers i, f, o (LSTM); GRU keeps b_hn inside the reset gate
    logits (B, V) = h_{L-1} @ W_out^T + b      (a new tensor each step)

G is 4 (LSTM), 3 (GRU) or 1 (RNN). Small batches on CPU run single-threaded (the matrices are too small
to share between threads); the caller's thread setting is restored before every return.

On CUDA, ``GraphSampler`` captures blocks of steps, each followed by the sampling of the next tokens on
the device, in one CUDA graph: a block of tokens costs one graph replay and one read of the token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import InputError
from .model import RNNModel, State

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
TABLE_MAX_ELEMENTS = 1 << 23  # the layer-0 lookup table (V x G*H) only while it stays small (32 MB in fp32)
SINGLE_THREAD_MAX_WORK = 1 << 13  # batch x hidden up to which one thread is fastest (measured on 2 cores)


def _reorder_lstm(w: torch.Tensor) -> torch.Tensor:
    """PyTorch's LSTM gate order (i, f, g, o) along dim 0 -> (i, f, o, g): one sigmoid covers i, f, o."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, f, o, g], 0)


class Stepper:
    """The weights of a unidirectional ``RNNModel`` prepared for one-token steps (built once, never modified).

    Built from the weights as they are at construction: build a new one after changing them. Dropout is
    not applied (generation runs the model in eval mode).
    """

    def __init__(self, model: RNNModel) -> None:
        c = model.config
        if c.bidirectional:
            raise InputError("this checkpoint has a bidirectional encoder, which can classify but not "
                             "generate; use a unidirectional model for text generation")
        self.arch, self.layers, self.hidden, self.vocab_size = c.arch, c.layers, c.hidden, c.vocab_size
        rnn, emb = model.encoder.rnn, model.encoder.embedding.weight
        self.device, self.dtype = emb.device, emb.dtype
        G, H = GATES[c.arch], c.hidden
        exact = torch.promote_types(self.dtype, torch.float32)  # the table is computed at least in fp32
        with torch.no_grad():
            def weight(kind: str, layer: int) -> torch.Tensor:
                w = getattr(rnn, f"{kind}_l{layer}").detach().to(exact)
                return _reorder_lstm(w) if c.arch == "lstm" else w

            def bias(kind: str, layer: int) -> torch.Tensor:
                b = getattr(rnn, f"{kind}_l{layer}", None)
                return torch.zeros(G * H, device=self.device, dtype=exact) if b is None else weight(kind, layer)

            def prepared(t: torch.Tensor) -> torch.Tensor:
                return t.to(self.dtype).contiguous()

            # Layer 0's input gates for every token id: embedding @ W_ih^T + b_ih (+ b_hh where it may be
            # added early: everywhere but GRU's n gate, whose b_hn sits inside the reset gate).
            x0 = emb.detach().to(exact) @ weight("weight_ih", 0).t() + bias("bias_ih", 0)  # (V, G*H)
            self.w_ih0 = None
            if x0.numel() <= TABLE_MAX_ELEMENTS:
                self.table = prepared(x0 + (bias("bias_hh", 0) if c.arch != "gru" else 0))
            else:  # too big a table: look up embedding rows and multiply
                self.table = prepared(emb.detach())
                self.w_ih0 = prepared(weight("weight_ih", 0).t())
                self.b_ih0 = prepared(bias("bias_ih", 0) + (bias("bias_hh", 0) if c.arch != "gru" else 0))
            self.w_hh0 = prepared(weight("weight_hh", 0).t())  # (H, G*H)
            self.b_hh0 = prepared(bias("bias_hh", 0)) if c.arch == "gru" else None
            # Layers 1..L-1. LSTM/RNN: one matmul of [h_below | h_own] with [W_ih; W_hh] stacked. GRU: two,
            # since h_own @ W_hn must stay apart from h_below @ W_in (the reset gate multiplies the former).
            self.upper: list[tuple[torch.Tensor, ...]] = []
            for layer in range(1, c.layers):
                w_ih, w_hh = weight("weight_ih", layer).t(), weight("weight_hh", layer).t()
                b_ih, b_hh = bias("bias_ih", layer), bias("bias_hh", layer)
                if c.arch == "gru":
                    self.upper.append((prepared(w_ih), prepared(b_ih), prepared(w_hh), prepared(b_hh)))
                else:
                    self.upper.append((prepared(torch.cat([w_ih, w_hh], 0)), prepared(b_ih + b_hh)))
            head = model.lm_head
            self.w_out = prepared(head.weight.detach().t())  # (H, V)
            b_out = head.bias.detach().clone()  # a copy: the model's own bias stays as trained
            if c.label_tokens:  # label tokens only ever begin a text: never generate one
                b_out[c.text_vocab_size:] = float("-inf")
            self.b_out = prepared(b_out)

    def streams(self, state: State | None = None, batch_size: int = 1) -> Streams:
        """Buffers for ``batch_size`` streams starting from ``state`` (zeros when None)."""
        return Streams(self, state, batch_size)

    def step(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (B, V) after ``tokens`` (B,) and the new state: what ``model(tokens.view(B, 1), state)`` gives."""
        streams = self.streams(state, tokens.size(0))
        logits = streams.advance(tokens)
        return logits, streams.state()


class Streams:
    """B token streams advancing together through a ``Stepper``: the state lives in buffers updated in place.

    ``advance`` takes the next token of each stream and returns the logits for the token after it;
    ``state()`` copies the state out in the model's format (tensors of (L, B, H)).
    """

    def __init__(self, stepper: Stepper, state: State | None, batch_size: int) -> None:
        s, B, H, L = stepper, batch_size, stepper.hidden, stepper.layers
        self.stepper, self.batch_size = s, B
        G = GATES[s.arch]
        options: dict[str, Any] = {"device": s.device, "dtype": s.dtype}
        self.hs = torch.zeros(B, L * H, **options)  # [h_0 | h_1 | ... ]: every layer's input is a slice
        self.cs = torch.zeros(L, B, H, **options) if s.arch == "lstm" else None
        if state is not None:
            self.hs.view(B, L, H).copy_(state[0].transpose(0, 1))
            if self.cs is not None:
                self.cs.copy_(state[1])
        self.single_thread = s.device.type == "cpu" and B * H <= SINGLE_THREAD_MAX_WORK
        # Every view used per step is made once here (making a view costs about as much as a small op).
        self.h = [self.hs[:, l * H:(l + 1) * H] for l in range(L)]
        self.h_state = self.hs.view(B, L, H).transpose(0, 1)  # hs in the state's (L, B, H) layout
        self.pairs = [self.hs[:, (l - 1) * H:(l + 1) * H] for l in range(1, L)]  # [h_{l-1} | h_l]
        self.top = self.h[-1]
        self.gates = torch.empty(B, G * H, **options)
        g = self.gates
        if s.arch == "lstm":
            self.ifo, self.cell_in = g[:, :3 * H], g[:, 3 * H:]
            self.i, self.f, self.o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H]
            self.c = list(self.cs.unbind(0))  # type: ignore[union-attr]
            self.tmp = torch.empty(B, H, **options)
        elif s.arch == "gru":
            self.hgates = torch.empty(B, 3 * H, **options)
            self.rz = torch.empty(B, 2 * H, **options)
            self.r, self.z = self.rz[:, :H], self.rz[:, H:]
            self.n = torch.empty(B, H, **options)
            gh = self.hgates
            self.gi_rz, self.gi_n, self.gh_rz, self.gh_n = g[:, :2 * H], g[:, 2 * H:], gh[:, :2 * H], gh[:, 2 * H:]
        if s.w_ih0 is not None:
            self.x0 = torch.empty(B, s.table.size(1), **options)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per stream (B,); logits (B, V) for the next one (a new tensor)."""
        threads = torch.get_num_threads() if self.single_thread else 1
        if threads != 1:
            torch.set_num_threads(1)
        try:
            return self._advance(tokens)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def _advance(self, tokens: torch.Tensor) -> torch.Tensor:
        s, g = self.stepper, self.gates
        # Layer 0's input gates into the gate buffer: a row of the table, or embedding row @ W_ih.
        if s.w_ih0 is None:
            torch.index_select(s.table, 0, tokens, out=g)
        else:
            torch.addmm(s.b_ih0, torch.index_select(s.table, 0, tokens, out=self.x0), s.w_ih0, out=g)
        if s.arch == "lstm":
            g.addmm_(self.h[0], s.w_hh0)
            self._lstm_cell(0)
            for layer, (w, b) in enumerate(s.upper, 1):
                torch.addmm(b, self.pairs[layer - 1], w, out=g)
                self._lstm_cell(layer)
        elif s.arch == "gru":
            self._gru_cell(0, s.w_hh0, s.b_hh0)  # type: ignore[arg-type]  # a GRU's Stepper has b_hh0
            for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(s.upper, 1):
                torch.addmm(b_ih, self.h[layer - 1], w_ih, out=g)
                self._gru_cell(layer, w_hh, b_hh)
        else:
            g.addmm_(self.h[0], s.w_hh0)
            torch.tanh(g, out=self.h[0])
            for layer, (w, b) in enumerate(s.upper, 1):
                torch.addmm(b, self.pairs[layer - 1], w, out=g)
                torch.tanh(g, out=self.h[layer])
        return torch.addmm(s.b_out, self.top, s.w_out)

    def _lstm_cell(self, layer: int) -> None:
        """c = f*c + i*g, h = o*tanh(c), from the pre-activations in the gate buffer (order i, f, o, g)."""
        c = self.c[layer]
        self.ifo.sigmoid_()
        self.cell_in.tanh_()
        c.mul_(self.f).addcmul_(self.i, self.cell_in)
        torch.mul(self.o, torch.tanh(c, out=self.tmp), out=self.h[layer])

    def _gru_cell(self, layer: int, w_hh: torch.Tensor, b_hh: torch.Tensor) -> None:
        """r, z = sigmoid(gi + gh); n = tanh(gi_n + r * gh_n); h = n + z * (h - n). gi is in the gate buffer."""
        h = self.h[layer]
        torch.addmm(b_hh, h, w_hh, out=self.hgates)
        torch.add(self.gi_rz, self.gh_rz, out=self.rz).sigmoid_()
        torch.addcmul(self.gi_n, self.r, self.gh_n, out=self.n).tanh_()
        torch.lerp(self.n, h, self.z, out=h)

    def state(self) -> State:
        """A copy of the state, (h,) or (h, c) each (L, B, H): never changed by later steps."""
        h = self.h_state.clone(memory_format=torch.contiguous_format)
        return (h,) if self.cs is None else (h, self.cs.clone())


class GraphSampler:
    """CUDA only: ``block`` steps of B streams, each sampling its next token on the device, in one CUDA graph.

    A small model's step on a GPU is bound by kernel launches, not arithmetic, and reading each token back
    to the host would stall the device once per token. A replay of the graph launches ``block`` steps at
    once: for each position it picks the tokens with ``pick(logits, gumbel)`` (``gumbel``: Gumbel noise
    drawn before the replay from the caller's generator) and advances with ``step(tokens, state) ->
    (logits, state)``. The token ids are read back once per block, while the next block already runs; with
    ``track`` the state and logits after every position are kept too, for a cursor that follows the text
    token by token.
    """

    def __init__(self, step: Callable[[torch.Tensor, State], tuple[torch.Tensor, State]], state: State,
                 logits: torch.Tensor, pick: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 noisy: bool, track: bool, block: int = 32) -> None:
        self.step, self.pick, self.track, self.block = step, pick, track, block
        with torch.inference_mode():  # so its buffers are inference tensors: its methods use this mode too
            self.state_in = tuple(s.clone(memory_format=torch.contiguous_format) for s in state)
            self.logits_in = logits.clone(memory_format=torch.contiguous_format)  # (B, V)
            self.gumbel = torch.zeros(block, *logits.shape, device=logits.device) if noisy else None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a warm-up run outside the capture sets up cuBLAS and cuDNN
                self._steps()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.tokens, self.states, self.logits = self._steps()
            self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.reset(state, logits)  # the warm-up moved the inputs on

    def _steps(self) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """The captured work: ``block`` picks and steps, ending where the next replay starts."""
        logits, state = self.logits_in, self.state_in
        tokens, states, all_logits = [], [], []
        for k in range(self.block):
            token = self.pick(logits, None if self.gumbel is None else self.gumbel[k])  # (B,)
            logits, state = self.step(token, state)
            tokens.append(token)
            if self.track:
                states.append(state)
                all_logits.append(logits)
        for s_in, s in zip(self.state_in, state):
            s_in.copy_(s)
        self.logits_in.copy_(logits)
        if not self.track:
            return torch.stack(tokens), (), None
        return (torch.stack(tokens), tuple(torch.stack(parts) for parts in zip(*states)),  # (block, L, B, H)
                torch.stack(all_logits))  # (block, B, V)

    @torch.inference_mode()
    def reset(self, state: State, logits: torch.Tensor) -> None:
        """Start the next block from ``state`` and ``logits`` (a captured graph is reused this way)."""
        for s_in, s in zip(self.state_in, state):
            s_in.copy_(s)
        self.logits_in.copy_(logits)

    @torch.inference_mode()
    def _launch(self, generator: torch.Generator) -> None:
        if self.gumbel is not None:
            self.gumbel.exponential_(generator=generator).log_().neg_()  # -log(Exp(1)): Gumbel(0, 1)
        self.graph.replay()

    def blocks(self, generator: torch.Generator, length: int) -> Iterator[tuple[list[list[int]], State,
                                                                                 torch.Tensor | None]]:
        """Run blocks until ``length`` tokens; for each yield the token ids (block, B) (the last cut at
        ``length``) and, with ``track``, copies of the state (block, L, B, H) and logits (block, B, V) after
        each position. While the caller reads one block, the device already computes the next."""
        count = -(-length // self.block)
        self._launch(generator)
        for b in range(count):
            with torch.inference_mode():
                self.host_tokens.copy_(self.tokens, non_blocking=True)
                states = tuple(s.clone() for s in self.states)  # () without track
                logits = self.logits.clone() if self.logits is not None else None
                self.copied.record()
            if b + 1 < count:
                self._launch(generator)
            self.copied.synchronize()
            yield self.host_tokens.tolist()[:length - b * self.block], states, logits
