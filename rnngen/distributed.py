"""Training in several processes at once: DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=4 -m rnngen train corpus.txt --out checkpoints/big

torchrun starts one process per GPU (or per share of the CPU) and tells each its place through the
environment (RANK, LOCAL_RANK, WORLD_SIZE). Each process reads its own lanes of the global batch
(see ``data.StreamBatches``) and carries the recurrent state of those lanes; DDP averages the
gradients, NCCL between GPUs and gloo between CPUs. Whatever steers the loop (a stop request, the
time budget, a NaN loss, the validation loss) is agreed through a collective, so that every rank
takes the same branch and none waits in a collective the others never enter. Rank 0 alone writes
files and talks to the user.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as tdist
from torch import nn

from .errors import CheckpointError, InputError, RnngenError, TrainingError

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long a rank waits in a collective before giving up. Long, because the other ranks wait in one
# while rank 0 tokenizes the corpus; a rank that dies is noticed at once (its connections close) and
# torchrun stops the others, so the timeout only matters for a rank that hangs.
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "RNNGEN_DIST_TIMEOUT", 1800.0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes; ``Dist()`` is a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # a process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK``, one GPU per process."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            if self.local_rank >= gpus:
                raise InputError(f"torchrun started more processes on this machine than it has GPUs ({gpus}); "
                                 f"use --nproc_per_node={gpus}, or --device cpu")
            return torch.device("cuda", self.local_rank)
        if device.type != "cpu":
            raise InputError(f"training in several processes runs on CUDA GPUs or CPUs, not on {device.type}; "
                             "use --device cuda or --device cpu")
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: ``model`` in DDP (which averages gradients over the ranks) when distributed.

        A collective (DDP sends rank 0's weights to the others): every rank must call it.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """``values`` summed (``op="max"``: their maximum) over the ranks; every rank gets the same numbers."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)  # a CPU tensor: through gloo, whatever the device
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every rank (the same shape on all), in rank order."""
        if not self.enabled:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        tdist.all_gather(parts, tensor.contiguous())
        return parts

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed by rank 0 while the others wait, its result sent to every rank.

        For work that must happen once (reading and tokenizing the corpus into the cache); if it
        fails, every rank raises the error.
        """
        if not self.enabled:
            return fn()
        result, error = _attempt(fn) if self.is_main else (None, None)
        box = [(result, _describe(error, self.rank))]
        tdist.broadcast_object_list(box, src=0)
        result, failure = box[0]
        if error is not None:
            raise error
        if failure is not None:
            raise _rebuild(failure)
        return cast(T, result)  # rank 0's result: it did not fail

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it fails on any, every rank raises, so that none is left waiting."""
        if not self.enabled:
            return fn()
        result, error = _attempt(fn)
        failures: list[Any] = [None] * self.world_size
        tdist.all_gather_object(failures, _describe(error, self.rank))
        if error is not None:
            raise error
        failure = next((f for f in failures if f is not None), None)
        if failure is not None:
            raise _rebuild(failure)
        return cast(T, result)  # no rank failed

    @contextmanager
    def on_main(self, context: AbstractContextManager[Any]) -> Iterator[None]:
        """Hold ``context`` on rank 0 only (the run lock: rank 0 is the one that writes); agreed like ``agree``."""
        with ExitStack() as stack:
            self.agree(lambda: stack.enter_context(context) if self.is_main else None)
            yield


@contextmanager
def session() -> Iterator[Dist]:
    """The process group torchrun asked for, torn down on leaving; ``Dist()`` when not under torchrun."""
    if not launched_by_torchrun():
        yield Dist()
        return
    rank, local_rank, world_size = (int(os.environ[name]) for name in TORCHRUN_ENV)
    created = not tdist.is_initialized()
    if created:
        # One group, two transports: CUDA tensors go through NCCL; CPU tensors, and the few Python
        # objects the ranks exchange, through gloo. So the training device need not be known yet.
        # NCCL only where each process of this machine can have a GPU (all ranks decide alike).
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        cuda = (torch.cuda.is_available() and tdist.is_nccl_available()
                and local_processes <= torch.cuda.device_count())
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        tdist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    try:
        yield Dist(rank, local_rank, world_size, enabled=True)
        if created:
            tdist.barrier()  # no rank tears the group down while another still uses it
    finally:
        if created:
            # Objects that still hold the group (a DDP wrapper) go first; the group's worker threads
            # must end now, not during interpreter shutdown, where they abort the process.
            gc.collect()
            tdist.destroy_process_group()


# -- errors crossing ranks --------------------------------------------------------------------------
_KINDS: dict[str, type[RnngenError]] = {cls.__name__: cls for cls in (InputError, CheckpointError, TrainingError)}


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return fn(), None
    except Exception as exc:  # handed to the other ranks, then raised here as it was
        return None, exc


def _describe(error: Exception | None, rank: int) -> tuple[str, str, int] | None:
    """What the other ranks need to raise the same error: (kind, message, rank)."""
    if error is None:
        return None
    if isinstance(error, RnngenError):
        kind = next(cls.__name__ for cls in type(error).__mro__ if cls.__name__ in _KINDS or cls is RnngenError)
        return kind, str(error), rank
    first_line = str(error).splitlines()[0] if str(error) else ""
    return "TrainingError", f"unexpected {type(error).__name__}: {first_line}", rank


def _rebuild(failure: tuple[str, str, int]) -> RnngenError:
    kind, message, rank = failure
    return _KINDS.get(kind, TrainingError)(message if rank == 0 else f"rank {rank}: {message}")
