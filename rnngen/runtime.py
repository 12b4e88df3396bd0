"""Where and how the model computes: the device, the precision, and the loss of a text (evaluation).

Shared by training, the loaded model and the tools built on it (inspection, export, serving).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import eval_windows
from .distributed import Dist
from .errors import InputError
from .model import RNNModel, State

LN2 = math.log(2.0)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is an InputError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether to compute in bf16 (weights and optimizer stay fp32).

    ``auto`` takes bf16 on CUDA and on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX), where
    oneDNN's bf16 LSTM is about twice as fast as fp32; elsewhere bf16 would be emulated and slower.
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, enabled: bool = True) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type in ("cuda", "cpu"))


@torch.no_grad()
def evaluate(model: RNNModel, tokens: np.ndarray, char_lengths: np.ndarray, device: torch.device,
             seq_len: int = 256, max_tokens: int | None = None, bf16: bool = False,
             dist: Dist | None = None) -> dict[str, float]:
    """Loss of ``tokens`` read in parallel lanes with the state carried: nats/token, nats/char, bits/char.

    With ``dist``, each rank reads its share of the lanes and the sums are added up over the ranks,
    so every rank gets the same result (a collective: all ranks must call it).
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_chars = 0.0, 0.0, 0.0
    state: State | None = None
    lengths = torch.from_numpy(char_lengths)
    for x, y in eval_windows(tokens, seq_len, max_tokens=max_tokens, rank=dist.rank, world_size=dist.world_size):
        with autocast(device, bf16):
            logits, state = model(x.to(device), state)
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        total_tokens += y.numel()
        total_chars += int(lengths[y].sum())
    model.train(was_training)
    total_nats, total_tokens, total_chars = dist.all_reduce([total_nats, total_tokens, total_chars])
    loss = total_nats / total_tokens
    per_char = total_nats / max(1, total_chars)
    return {"loss": loss, "nats_per_char": per_char, "bits_per_char": per_char / LN2,
            "perplexity": math.exp(min(loss, 50.0)), "tokens": int(total_tokens)}


def _jiffies() -> tuple[int, int, int] | None:
    """CPU time so far (in clock ticks): the machine's busy time, its total time, and this process's; None
    where /proc is not there to read."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal, *_ = map(int, f.readline().split()[1:])
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    except (OSError, ValueError):
        return None
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, int(own[11]) + int(own[12])  # utime + stime


class ThreadTuner:
    """Trains with one thread while other processes use the CPU, with all of them while it is free.

    Alone on a machine, OpenMP's threads share each step's work and wait for each other by spinning. Beside
    another CPU job they spin while the other job holds the cores, and steps take many times as long, for both
    jobs (measured on 2 cores, benchmarks/busy_machine.py: 12.6x and 8.2x); one thread never waits for another.
    Every ``CHECK`` seconds the machine's CPU time, less this process's own, says how many cores others use.
    """

    CHECK = 2.0  # seconds between looks at the machine
    BUSY, FREE = 0.5, 0.25  # cores used by others above which one thread is used, below which all again

    def __init__(self, device: torch.device, others: Callable[[], float | None] | None = None) -> None:
        self.counts = (torch.get_num_threads(), 1)
        # RNNGEN_THREADS=keep: leave the threads as they are (to compare, or when the user pins them).
        self.enabled = device.type == "cpu" and self.counts[0] > 1 and os.environ.get("RNNGEN_THREADS") != "keep"
        self.others = others or self._others_from_proc
        self.current, self.next_check = self.counts[0], 0.0
        self._last = _jiffies()

    def _others_from_proc(self) -> float | None:
        """Cores used by other processes since the last look (None if it cannot be read)."""
        now = _jiffies()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        busy, total, own = (a - b for a, b in zip(now, last))
        return max(0.0, busy - own) / total * (os.cpu_count() or 1)

    def step_done(self, seconds: float, elapsed: float) -> None:
        """Called after each training step, ``elapsed`` seconds into the run; maybe change the threads."""
        if not self.enabled or elapsed < self.next_check:
            return
        self.next_check = elapsed + self.CHECK
        others = self.others()
        if others is None:
            return
        wanted = self.counts[1] if others > self.BUSY else self.counts[0] if others < self.FREE else self.current
        if wanted != self.current:
            self.current = wanted
            torch.set_num_threads(wanted)

    def restore(self) -> None:
        """Back to the thread count the run started with."""
        if self.enabled:
            torch.set_num_threads(self.counts[0])
