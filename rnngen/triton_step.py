"""An LSTM's one-token step at batch 1 in Triton kernels: one kernel per layer and one for the logits.

Through cuDNN, a batch-1 step of a small LSTM on a GPU is a dozen short kernels (input projection, the
recurrent matmul, the cell, per layer; then the output layer), each costing a launch and a trip to
memory. Here each layer is one kernel that reads [x | h] once, computes its units' four gates and the
cell update together; the logits are one more. The weights come from a ``Stepper`` (gate order i, f, o, g;
layer 0's input gates as a per-token table), laid out gate-major: row ``g * H + u`` of a (4H, K) matrix.

The step is functional (new state tensors each call), like the model's own, so ``GraphSampler`` captures it
in a CUDA graph unchanged. Triton is optional: ``triton_step`` returns None where it cannot run. On a CPU
with ``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter (how the tests check them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fastpath import Stepper
from .model import State

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with PyTorch's CUDA builds; without it the cuDNN step is used
    triton = None

# The tiling, from benchmarks/triton_sweep.py on an H200 (3x512 LSTM): one unit per program (512 programs
# keep every SM busy) and each row read in one pass (all loads in flight at once) was 1.65x the first
# tiling tried (4 units, 256-wide passes).
UNITS = 1  # hidden units per program: 4 gates x 1 unit = 4 weight rows
BLOCK_K = None  # inputs per pass of the inner loop; None: a whole row in one pass
BLOCK_V = 8  # logits per program
NUM_WARPS = 4
MAX_ROW_PASS = 2048  # "a whole row in one pass" stops here, so very wide layers loop (a cap, not measured)

Step = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]

if triton is not None:
    @triton.jit
    def _tanh(x):  # from sigmoid: a tanh of Triton's own is backend-specific and absent from its interpreter
        return 2 * tl.sigmoid(2 * x) - 1

    @triton.jit
    def _lstm_layer(w_ptr, bias_ptr, x_ptr, h_ptr, c_ptr, h_out_ptr, c_out_ptr, token_ptr, K_IN, H,
                    TABLE: tl.constexpr, UNITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """New h and c of UNITS units: gates = bias + W @ [x | h] (W: (4H, K_IN + H), gates i, f, o, g).
        With TABLE, bias is layer 0's (V, 4H) table of input gates and the row is the token's (K_IN = 0)."""
        u = tl.program_id(0) * UNITS + tl.arange(0, UNITS)
        um = u < H
        K = K_IN + H
        if TABLE:
            row = tl.load(token_ptr).to(tl.int64) * 4 * H
        else:
            row = 0
        acc_i = tl.load(bias_ptr + row + u, mask=um, other=0.0)
        acc_f = tl.load(bias_ptr + row + H + u, mask=um, other=0.0)
        acc_o = tl.load(bias_ptr + row + 2 * H + u, mask=um, other=0.0)
        acc_g = tl.load(bias_ptr + row + 3 * H + u, mask=um, other=0.0)
        gate = H * K  # the distance between one gate's rows and the next gate's
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            v = (tl.load(x_ptr + k, mask=k < K_IN, other=0.0)
                 + tl.load(h_ptr + (k - K_IN), mask=(k >= K_IN) & (k < K), other=0.0))[None, :]
            m = um[:, None] & (k < K)[None, :]
            w = w_ptr + u[:, None] * K + k[None, :]
            acc_i += tl.sum(tl.load(w, mask=m, other=0.0) * v, axis=1)
            acc_f += tl.sum(tl.load(w + gate, mask=m, other=0.0) * v, axis=1)
            acc_o += tl.sum(tl.load(w + 2 * gate, mask=m, other=0.0) * v, axis=1)
            acc_g += tl.sum(tl.load(w + 3 * gate, mask=m, other=0.0) * v, axis=1)
        c = tl.sigmoid(acc_f) * tl.load(c_ptr + u, mask=um, other=0.0) + tl.sigmoid(acc_i) * _tanh(acc_g)
        tl.store(c_out_ptr + u, c, mask=um)
        tl.store(h_out_ptr + u, tl.sigmoid(acc_o) * _tanh(c), mask=um)

    @triton.jit
    def _logits(w_ptr, b_ptr, h_ptr, out_ptr, V, H, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_V logits: b + W @ h, W (V, H)."""
        r = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        rm = r < V
        acc = tl.load(b_ptr + r, mask=rm, other=0.0)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(h_ptr + k, mask=k < H, other=0.0)
            w = tl.load(w_ptr + r[:, None] * H + k[None, :], mask=rm[:, None] & (k < H)[None, :], other=0.0)
            acc += tl.sum(w * h[None, :], axis=1)
        tl.store(out_ptr + r, acc, mask=rm)


class TritonLSTM:
    """A ``Stepper``'s LSTM weights in the kernels' layout; ``step`` is what ``Stepper.step`` computes, at batch 1."""

    def __init__(self, stepper: Stepper, units: int = UNITS, block_k: int | None = BLOCK_K, block_v: int = BLOCK_V,
                 num_warps: int = NUM_WARPS) -> None:
        s = stepper
        self.hidden, self.vocab_size = s.hidden, s.vocab_size
        self.units, self.block_v, self.num_warps = units, block_v, num_warps
        # Stepper keeps W^T (K, 4H) for addmm; the kernels read W (4H, K), one row per gate and unit. Layer 0's
        # "bias" is the (V, 4H) table of its input gates (both biases included), one row per token id.
        self.weights = [(s.w_hh0.t().contiguous(), s.table, 0)]
        self.weights += [(w.t().contiguous(), b, self.hidden) for w, b in s.upper]
        self.w_out, self.b_out = s.w_out.t().contiguous(), s.b_out
        # Inputs per pass of each layer's inner loop, and of the logits kernel's
        def row_pass(k: int) -> int:
            return block_k or min(triton.next_power_of_2(k), MAX_ROW_PASS)

        self.block_k = [row_pass(k_in + self.hidden) for _, _, k_in in self.weights]
        self.block_k_out = row_pass(self.hidden)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits (1, V) after ``tokens`` (1,) and the new state ((L, 1, H) each, new tensors)."""
        h, c = (s.contiguous() for s in state)
        h_new, c_new = torch.empty_like(h), torch.empty_like(c)
        H = self.hidden
        for layer, ((w, bias, k_in), block_k) in enumerate(zip(self.weights, self.block_k)):
            x = h_new[layer - 1] if layer else h[layer]  # layer 0 reads no x (its input gates are in the table)
            _lstm_layer[(triton.cdiv(H, self.units),)](
                w, bias, x, h[layer], c[layer], h_new[layer], c_new[layer], tokens, k_in, H, TABLE=layer == 0,
                UNITS=self.units, BLOCK_K=block_k, num_warps=self.num_warps)
        logits = torch.empty(1, self.vocab_size, device=h.device, dtype=h.dtype)
        _logits[(triton.cdiv(self.vocab_size, self.block_v),)](
            self.w_out, self.b_out, h_new[-1], logits, self.vocab_size, H, BLOCK_V=self.block_v,
            BLOCK_K=self.block_k_out, num_warps=self.num_warps)
        return logits, (h_new, c_new)


def triton_step(stepper: Stepper) -> Step | None:
    """The Triton step for ``stepper``'s model, or None where it does not apply: no Triton, not an fp32
    LSTM, or a vocabulary too large for layer 0's table."""
    if triton is None or stepper.arch != "lstm" or stepper.dtype != torch.float32 or stepper.w_ih0 is not None:
        return None
    return TritonLSTM(stepper).step
