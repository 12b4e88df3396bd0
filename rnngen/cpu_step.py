"""Batch-1 sampling of an LSTM, GRU or plain RNN on the CPU in compiled C: a block of steps and their sampling
in one call.

At batch 1 the torch step (``fastpath.Streams``) spends about half its time in the overhead of a dozen
small operations per token, and torch's matrix-vector products read the weights at a fraction of the
speed the CPU's caches allow. ``cpu_step.c`` does a whole block of tokens per call: each step's gates,
cell updates and logits with the weights laid out for streaming reads, split between threads by hidden
units, then the pick of the next token from Exp(1) noise drawn by torch from the caller's generator
(the draws the plain path makes, in the same order). Same seed, same text as the plain path.

The C file is compiled once with the machine's C compiler (``CC``, else ``cc``, ``gcc`` or ``clang``) into
rnngen's cache, keyed by the source, the compiler, its flags and the CPU. Where nothing compiles, or with
``RNNGEN_NATIVE=0``, ``library()`` raises ``NativeUnavailable`` saying why, and generation uses the torch
step instead (``Generator.native_error`` keeps the reason).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpora import cache_dir
from .fastpath import Stepper
from .model import State

SOURCE = Path(__file__).with_name("cpu_step.c")
UNITS = 32  # hidden units per block of the C code's weights (UB there)
ARCH_CODES = {"lstm": 0, "gru": 1, "rnn": 2}  # rnngen_sample's arch
MAX_THREADS = 4  # a batch-1 step has little work to share; 2 threads measured (the development machine has 2)
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])  # the first that builds

_library: ctypes.CDLL | Exception | None = None  # built or loaded once per process; an Exception: why not


class NativeUnavailable(RuntimeError):
    """The compiled step cannot be used here (no compiler, disabled, or an unsupported model)."""


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: -march=native builds for this CPU."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> ctypes.CDLL:
    if os.environ.get("RNNGEN_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by RNNGEN_NATIVE=0")
    compiler = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if compiler is None:
        raise NativeUnavailable("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        path = cache_dir() / "native" / f"cpu_step-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-lm"],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
                    continue
                os.replace(built, path)  # whole or absent: a concurrent build never loads half a file
        library = ctypes.CDLL(str(path))
        library.rnngen_sample.restype = None
        return library
    raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: {'; '.join(errors)}")


def library() -> ctypes.CDLL:
    """The compiled C step (built on first use); raises NativeUnavailable saying why it cannot be."""
    global _library
    if _library is None:
        try:
            _library = _build()
        except (NativeUnavailable, OSError, subprocess.SubprocessError) as exc:
            _library = exc if isinstance(exc, NativeUnavailable) else NativeUnavailable(str(exc))
    if isinstance(_library, Exception):
        raise _library
    return _library


def _gate_blocks(m: torch.Tensor, hidden: int, padded: int) -> torch.Tensor:
    """(..., G * H), G gates (LSTM: i, f, o, g; GRU: r, z, n; RNN: one) -> (..., HP / UNITS, G * UNITS): each
    block the G gates of its units."""
    lead, gates = m.shape[:-1], m.shape[-1] // hidden
    m = F.pad(m.reshape(*lead, gates, hidden), (0, padded - hidden))
    return (m.reshape(*lead, gates, padded // UNITS, UNITS).transpose(-3, -2)
            .reshape(*lead, padded // UNITS, gates * UNITS))


def _pad_inputs(w: torch.Tensor, parts: int, hidden: int, padded: int) -> torch.Tensor:
    """(parts * H, N) -> (parts * HP, N): zero rows for the padded units of each part."""
    return F.pad(w.reshape(parts, hidden, -1), (0, 0, 0, padded - hidden)).reshape(parts * padded, -1)


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    """A C array of the tensors' data pointers (one null entry when there are none)."""
    return (ctypes.c_void_p * max(1, len(tensors)))(*(t.data_ptr() for t in tensors))


class NativeRNN:
    """An LSTM's, GRU's or plain RNN's weights from a ``Stepper`` laid out for ``cpu_step.c`` (built once; the
    weights must not change).

    Hidden units are padded to a multiple of UNITS with zero weights, which keeps the padded units at 0.
    """

    def __init__(self, stepper: Stepper) -> None:
        s = stepper
        if s.dtype != torch.float32 or s.device.type != "cpu" or s.w_ih0 is not None:
            raise NativeUnavailable("the compiled step is for fp32 models on the CPU with a per-token input table")
        self.library = library()
        self.arch = s.arch
        self.layers, self.hidden, self.vocab_size = s.layers, s.hidden, s.vocab_size
        H = s.hidden
        HP = self.padded = -(-H // UNITS) * UNITS

        def panels(w: torch.Tensor, parts: int) -> torch.Tensor:  # (parts * H, G * H) -> (blocks, parts * HP, G * UB)
            return _gate_blocks(_pad_inputs(w, parts, H, HP), H, HP).transpose(0, 1).contiguous()

        def blocks(b: torch.Tensor) -> torch.Tensor:
            return _gate_blocks(b, H, HP).contiguous()

        self.table = blocks(s.table)
        in_panels: list[torch.Tensor] = []
        in_biases: list[torch.Tensor] = []
        if self.arch == "gru":  # hidden-to-hidden and input weights apart: the reset gate multiplies h @ W_hn alone
            self.panels = [panels(s.w_hh0, 1)] + [panels(w_hh, 1) for _, _, w_hh, _ in s.upper]
            self.biases = [blocks(s.b_hh0)] + [blocks(b_hh) for _, _, _, b_hh in s.upper]  # type: ignore[arg-type]
            in_panels = [panels(w_ih, 1) for w_ih, _, _, _ in s.upper]
            in_biases = [blocks(b_ih) for _, b_ih, _, _ in s.upper]
        else:  # an LSTM, or a plain RNN laid out as a one-gate LSTM
            self.panels = [panels(s.w_hh0, 1)] + [panels(w, 2) for w, _ in s.upper]
            self.biases = [blocks(b) for _, b in s.upper]
        self.inputs = (in_panels, in_biases)  # kept alive: the C code reads them through the pointers below
        self.w_out = _pad_inputs(s.w_out, 1, H, HP).contiguous()
        self.b_out = s.b_out.contiguous()
        self.panel_ptrs, self.bias_ptrs = _pointers(self.panels), _pointers(self.biases)
        self.in_panel_ptrs, self.in_bias_ptrs = _pointers(in_panels), _pointers(in_biases)
        self.threads: int | None = None  # None: torch's thread count, at most MAX_THREADS and one per block

    def thread_count(self) -> int:
        wanted = self.threads or min(torch.get_num_threads(), MAX_THREADS)
        return max(1, min(wanted, self.padded // UNITS))

    def sample(self, h: torch.Tensor, c: torch.Tensor, logits: torch.Tensor, noise: torch.Tensor | None,
               temperature: float, steps: int, track: bool, top_k: int | None = None,
               top_p: float | None = None) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """``steps`` picks and steps from h, c (L, HP; used by an LSTM alone) and logits (V,), all updated in place.

        Returns the tokens (steps,) and, with ``track``, the state ((steps, L, 1, H) each: h, and c for an
        LSTM) and logits
        (steps, 1, V) after every step; greedy when ``noise`` is None (``temperature``, ``top_k`` and
        ``top_p`` are then unused).
        """
        L, HP, V = self.layers, self.padded, self.vocab_size
        tokens = torch.empty(steps, dtype=torch.int64)
        track_h = torch.empty(steps, L, HP) if track else None
        track_c = torch.empty(steps, L, HP) if track and self.arch == "lstm" else None
        track_logits = torch.empty(steps, V) if track else None

        def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
            return ctypes.c_void_p(t.data_ptr() if t is not None else None)

        hn, scratch = torch.empty_like(h), torch.empty_like(logits)
        work = torch.empty(V, 2, dtype=torch.int32)  # cpu_step.c's `ranked`: (value, index) pairs of 4 bytes each
        self.library.rnngen_sample(
            ctypes.c_int(ARCH_CODES[self.arch]), self.panel_ptrs, ptr(self.table), self.bias_ptrs, self.in_panel_ptrs,
            self.in_bias_ptrs, ptr(self.w_out), ptr(self.b_out),
            ctypes.c_int(L), ctypes.c_int(HP), ctypes.c_int(V), ptr(h), ptr(hn), ptr(c), ptr(logits), ptr(scratch),
            ptr(work), ptr(noise), ctypes.c_float(temperature), ctypes.c_int(top_k or 0),
            ctypes.c_float(1.0 if top_p is None else top_p), ctypes.c_int(steps),
            ctypes.c_int(self.thread_count()), ptr(tokens), ptr(track_h), ptr(track_c), ptr(track_logits))
        if not track:
            return tokens, (), None
        H = self.hidden
        states = tuple(t[:, :, None, :H] for t in (track_h, track_c) if t is not None)
        return tokens, states, track_logits[:, None]  # type: ignore[index]


class NativeSampler:
    """``GraphSampler``'s interface for one stream on the CPU: blocks of tokens from ``NativeRNN``.

    ``temperature`` None means greedy; ``top_k`` and ``top_p`` filter as ``generate.filter_logits``. The
    noise for a block is drawn before it runs, (block, V) Exp(1) values from the caller's generator: the
    same values, in the same order, as one draw per step.
    """

    def __init__(self, net: NativeRNN, state: State, logits: torch.Tensor, temperature: float | None,
                 track: bool, block: int, top_k: int | None = None, top_p: float | None = None) -> None:
        self.net, self.temperature, self.track, self.block = net, temperature, track, block
        self.top_k, self.top_p = top_k, top_p
        self.h = torch.zeros(net.layers, net.padded)
        self.c = torch.zeros(net.layers, net.padded)
        self.logits = torch.empty(net.vocab_size)
        self.reset(state, logits)

    def reset(self, state: State, logits: torch.Tensor) -> None:
        """Start the next block from ``state`` ((L, 1, H) each: h, and c for an LSTM) and ``logits`` (1, V)."""
        H = self.net.hidden
        for buffer, part in zip((self.h, self.c), state):
            buffer[:, :H].copy_(part[:, 0])
        self.logits.copy_(logits[0])

    def blocks(self, generator: torch.Generator, length: int) -> Iterator[tuple[list[list[int]], State,
                                                                                torch.Tensor | None]]:
        """Blocks of tokens until ``length``: for each, the token ids (block, 1) and, with ``track``, the
        state (block, L, 1, H) and logits (block, 1, V) after each position."""
        for start in range(0, length, self.block):
            steps = min(self.block, length - start)
            noise = None
            if self.temperature is not None:
                noise = torch.empty(steps, self.net.vocab_size).exponential_(generator=generator)
            tokens, states, logits = self.net.sample(self.h, self.c, self.logits, noise, self.temperature or 0.0,
                                                     steps, self.track, self.top_k, self.top_p)
            yield [[t] for t in tokens.tolist()], states, logits
