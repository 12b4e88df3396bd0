"""The training loop that the language-model and the classifier trainers share.

``TrainLoop`` owns everything a run does the same way whatever it learns: the budget (steps, time), the
learning-rate schedule, the optimisation step with its NaN roll-back, the moving average of the weights
(--ema), the evaluation cadence with early stopping, saving ``best/`` and ``last/``, exact resume, the
agreement between torchrun processes, and stopping cleanly on Ctrl-C or SIGTERM. A trainer supplies its
loss (``compute_loss``) and its evaluation (``evaluate`` and ``take_if_best``). It knows nothing of the
terminal: it reports through a callback of ``TrainEvent``s.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import BEST, LAST, append_metrics, resolve_checkpoint_dir, run_lock, save_checkpoint
from .config import RunConfig, to_dict
from .distributed import Dist
from .errors import CheckpointError, InputError, TrainingError
from .model import RNNModel, State
from .runtime import ThreadTuner, use_bf16
from .tokenizers import Tokenizer

DECAY_SHARE = 0.2  # wsd: the share of the budget, at its end, over which the learning rate decays
FIRST_SAVE_SECONDS = 60.0  # the first time-based resume point comes this soon (or at save_time, if sooner)


@dataclass
class TrainEvent:
    """What the loop tells its caller: kind is start, step, eval, nan or end."""

    kind: str
    step: int
    max_steps: int | None  # None: the run is bounded by time alone
    elapsed: float
    max_time: float | None = None
    loss: float | None = None
    lr: float | None = None
    chars_per_s: float | None = None  # step: over the last few seconds; end: the run's average
    val: dict[str, Any] | None = None
    message: str = ""  # start: what the run is (the headline); nan: what happened; end: why it stopped
    sample: str | None = None  # eval: a text sampled from the model as it is now (TrainConfig.sample_length)


@dataclass
class RunResult:
    """How a run ended: its steps and time, why it stopped, its best and last validation."""

    run_dir: Path
    steps: int
    elapsed: float
    stopped: str  # max_steps, max_time, early_stop or interrupted
    best_val: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, Any] = field(default_factory=dict)
    train_loss: float | None = None
    corpus: str = ""
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "steps": self.steps, "seconds": round(self.elapsed, 2),
                "stopped": self.stopped, "train_loss": self.train_loss, "best": self.best_val,
                "last": self.last_val, "corpus": self.corpus, "parameters": self.params}


@dataclass
class Position:
    """Where the loop is; everything in it is saved for an exact resume."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    elapsed: float = 0.0
    best_loss: float = math.inf
    best_accuracy: float = -1.0  # classifiers: the best validation accuracy so far
    best_step: int = 0
    evals_since_best: int = 0
    lr_scale: float = 1.0  # halved at each NaN roll-back
    nan_retries: int = 0


def lr_at(config: RunConfig, step: int, progress: float) -> float:
    """Linear warm-up, then the schedule down to ``lr * min_lr_ratio`` as ``progress`` goes 0 -> 1.

    ``cosine`` decays over the whole budget. ``wsd`` (warm-up, stable, decay) holds the peak and decays linearly
    over the last ``DECAY_SHARE`` of the budget: on a short budget a cosine spends half the run at half the rate
    or less (measured, issue 17: 0.2 nats/char lost in 120 s), while a run bounded by time only learns where
    it ends once it is nearly there; the final decay keeps what annealing gives.
    """
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = min(1.0, progress)
    if config.schedule == "wsd":
        shape = min(1.0, (1.0 - progress) / DECAY_SHARE)
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * warm * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


def make_optimizer(model: RNNModel, config: RunConfig, device: torch.device,
                   scaled: list[tuple[list[torch.nn.Parameter], float]] | None = None) -> torch.optim.AdamW:
    """AdamW over ``scaled`` (parameter lists, each with its learning-rate scale; by default all parameters at
    1). Matrices are decayed; biases, norms and the embedding are not."""
    param_groups = []
    for params, scale in scaled or [(list(model.parameters()), 1.0)]:
        decay = [p for p in params if p.ndim >= 2 and p is not model.encoder.embedding.weight]
        rest = [p for p in params if not any(p is d for d in decay)]
        param_groups += [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": scale},
                         {"params": rest, "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=config.lr, betas=(0.9, 0.99),
                             fused=device.type == "cuda")


def optimizer_to_saved(opt: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors = {f"optim.{idx}.{key}": value for idx, st in sd["state"].items() for key, value in st.items()
               if torch.is_tensor(value)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return groups, tensors


def optimizer_from_saved(opt: torch.optim.Optimizer, groups: list[dict[str, Any]],
                         tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what ``optimizer_to_saved`` kept; moments go to ``device``, step counts stay on the CPU."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging), for evaluation and keeping.

    The average of the last few hundred steps' weights generalises better than the weights of any one
    step, which on a small data set jump from batch to batch. Early on the decay is lowered to
    (1 + n) / (10 + n) after n updates, so the average is not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (the trained ones are put back after)."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": a for i, a in enumerate(self.average)}

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from ``state()``'s tensors, after ``updates`` updates."""
        if "ema.0" not in tensors:
            raise InputError("this run was trained without --ema; resume it without --ema")
        with torch.no_grad():
            torch._foreach_copy_(self.average, [tensors[f"ema.{i}"] for i in range(len(self.average))])
        self.updates = updates


def averaged(average: WeightAverage | None) -> Any:
    """A context with the weights that are evaluated and kept: the moving average with --ema, else as they are."""
    return average.swapped_in() if average is not None else nullcontext()


def _rng_key(kind: str, rank: int) -> str:
    """Where a rank's RNG state is saved: rank 0's where a single process keeps its own."""
    return f"rng.{kind}" if rank == 0 else f"rng.{kind}.{rank}"


# -- run directories ---------------------------------------------------------------------------------------

def has_run(run_dir: Path) -> bool:
    try:
        resolve_checkpoint_dir(run_dir)
        return True
    except CheckpointError:
        return False


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not write over another one."""
    if has_run(run_dir):
        raise InputError(f"{run_dir} already holds a training run; pass --resume to continue it, "
                         "or choose another --out")


def resume_point(run_dir: Path) -> Path:
    """The ``last/`` checkpoint a resumed run continues from."""
    last = run_dir / LAST
    if not (last / "config.json").is_file():
        raise InputError(f"nothing to resume in {run_dir} (no {LAST}/ checkpoint); start a new run instead")
    return last


# -- the loop ---------------------------------------------------------------------------------------------

class TrainLoop:
    """Trains ``model`` into ``run_dir``: call ``run()`` (or ``run_to_end``, which also takes the lock and
    the signals). Subclasses supply ``compute_loss``, ``evaluate`` and ``take_if_best``.

    With ``dist`` (torchrun), every rank builds its trainer and calls the same methods in the same order:
    saving, evaluating and stopping involve all ranks, and only rank 0 writes.
    """

    CONFIG_KEY = "train_config"  # where trainer_state.json keeps the run's configuration

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, config: RunConfig, run_dir: Path,
                 meta: dict[str, Any], device: torch.device, callback: Callable[[TrainEvent], None] | None = None,
                 stop: threading.Event | None = None, dist: Dist | None = None,
                 scaled: list[tuple[list[torch.nn.Parameter], float]] | None = None) -> None:
        self.model, self.tokenizer, self.config = model.to(device), tokenizer, config
        self.run_dir, self.meta, self.device = run_dir, meta, device
        self.callback = callback or (lambda event: None)
        self.stop = stop or threading.Event()
        self.dist = dist or Dist()
        self.net: torch.nn.Module = self.model  # what the loss is computed with: wrapped in DDP by run()
        self.optimizer = make_optimizer(self.model, config, device, scaled)
        self.average = WeightAverage(self.model, config.ema) if config.ema > 0 else None
        self.bf16 = use_bf16(device, config.precision)
        self.pos = Position()
        self.state: State | None = None  # language models: the recurrent state carried between windows
        self.max_steps: int | None = config.max_steps  # None: bounded by time alone
        self.eval_every: int = config.eval_every or 1
        self.chars_per_step = 0.0  # for the progress bar's speed (0: not shown)
        self.last_val: dict[str, Any] = {}
        self.best_val: dict[str, Any] = {}
        self.train_loss: float | None = None
        self._good: dict[str, Any] | None = None
        self._saved_at = 0.0  # elapsed seconds at the last save of last/
        self.threads = ThreadTuner(device)

    # -- what a trainer supplies ------------------------------------------------------------------------
    def compute_loss(self) -> torch.Tensor:
        """The loss of the next batch (advancing the position in the data), ready for backward()."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimisation step (language models carry their state on)."""

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the model as it is (a collective under torchrun)."""
        raise NotImplementedError

    def take_if_best(self, val: dict[str, Any]) -> bool:
        """Whether ``val`` is the best so far; if so, record it in ``pos`` (best_loss, ...)."""
        raise NotImplementedError

    def sample_text(self) -> str | None:
        """A text written by the model at an evaluation, for the caller to show (None: none)."""
        return None

    def headline(self) -> str:
        """One line saying what this run is, for the caller to show as it starts."""
        return ""

    def said_choice(self, resumed: bool) -> str:
        """The line of what ``--preset auto`` chose, said before a new run's headline (a resumed run chose before)."""
        chosen = self.meta.get("training", {}).get("chosen")
        return f"chosen for this data and budget: {chosen['line']}\n" if chosen and not resumed else ""

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What else resuming needs, beyond the loop's own state (a collective under torchrun)."""
        return {}, {}

    def restore_extra(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from what ``extra_state`` kept."""

    def extra_meta(self) -> dict[str, Any]:
        """What else a checkpoint's config.json records of the run."""
        return {}

    # -- saving and restoring ------------------------------------------------------------------------------
    def _trainer_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What resuming needs, the RNG states of every rank included (a collective)."""
        groups, tensors = optimizer_to_saved(self.optimizer)
        rngs = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rngs["cuda"] = torch.cuda.get_rng_state(self.device)
        for kind, rng in rngs.items():
            for rank, rank_rng in enumerate(self.dist.gather(rng)):
                tensors[_rng_key(kind, rank)] = rank_rng
        if self.average is not None:
            tensors.update(self.average.state())
        extra, extra_tensors = self.extra_state()
        state = {"position": vars(self.pos).copy(), "optimizer_groups": groups,
                 self.CONFIG_KEY: to_dict(self.config), **extra, **self.meta.get("resume", {})}
        return state, {**tensors, **extra_tensors}

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a saved trainer state (see ``_trainer_state``)."""
        self.pos = Position(**state["position"])
        optimizer_from_saved(self.optimizer, state["optimizer_groups"], tensors, self.device)
        rank = self.dist.rank
        if _rng_key("cpu", rank) in tensors:
            torch.set_rng_state(tensors[_rng_key("cpu", rank)])
        else:  # resumed with more processes than the run had: this rank starts a stream of its own
            torch.manual_seed(self.config.seed + rank)
        if self.device.type == "cuda" and _rng_key("cuda", rank) in tensors:
            torch.cuda.set_rng_state(tensors[_rng_key("cuda", rank)], self.device)
        if self.average is not None:
            self.average.load(tensors, self.pos.step)
        self.restore_extra(state, tensors)
        self._saved_at = self.pos.elapsed

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's config.json records of the run (per-class tables and confusion left out)."""
        brief = lambda v: {k: x for k, x in v.items() if not isinstance(x, (dict, list))}  # noqa: E731
        meta = {"training": {**self.meta.get("training", {}), "step": self.pos.step,
                             "seconds": round(self.pos.elapsed, 1), "best_step": self.pos.best_step,
                             "best_val": brief(self.best_val), "last_val": brief(self.last_val)}}
        for key, value in self.extra_meta().items():
            meta[key] = {**meta.get(key, {}), **value}
        return meta

    def save_last(self) -> None:
        state, tensors = self._trainer_state()
        if self.dist.is_main:
            save_checkpoint(self.run_dir / LAST, self.model, self.tokenizer, self.checkpoint_meta(), state, tensors)
        self._saved_at = self.pos.elapsed

    def _snapshot(self) -> None:
        """Keep the last good state in memory, to roll back to if the loss turns NaN."""
        self._good = {"model": copy.deepcopy(self.model.state_dict()),
                      "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                      "pos": replace(self.pos), "state": self.state,
                      "average": {k: v.clone() for k, v in (self.average.state() if self.average else {}).items()}}

    def _roll_back(self) -> None:
        if self._good is None or self.pos.nan_retries >= self.config.max_nan_retries:
            raise TrainingError(f"the loss became NaN/inf at step {self.pos.step} and kept diverging after "
                                f"{self.pos.nan_retries} roll-backs; lower --lr or --grad-clip. "
                                f"The best checkpoint in {self.run_dir} is intact")
        retries, scale = self.pos.nan_retries + 1, self.pos.lr_scale * 0.5
        bad_step, elapsed = self.pos.step, self.pos.elapsed
        self.model.load_state_dict(self._good["model"])
        self.optimizer.load_state_dict(self._good["optimizer"])
        self.pos, self.state = replace(self._good["pos"]), self._good["state"]
        if self.average is not None:
            self.average.load(self._good["average"], self.pos.step)
        self.pos.nan_retries, self.pos.lr_scale, self.pos.elapsed = retries, scale, elapsed  # time never rewinds
        self._emit("nan", message=f"loss became NaN/inf at step {bad_step}: rolled back to step "
                                  f"{self.pos.step}, learning rate x{scale:g}")

    # -- the loop -------------------------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        self.callback(TrainEvent(kind, self.pos.step, self.max_steps, self.pos.elapsed, self.config.max_time,
                                 **fields))

    def progress(self) -> float:
        """How far the run is through its budget, 0 -> 1: steps or time, whichever is further."""
        by_time = self.pos.elapsed / self.config.max_time if self.config.max_time else 0.0
        return max(self.pos.step / self.max_steps if self.max_steps else 0.0, by_time)

    def _train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None if it was not finite."""
        lr = lr_at(self.config, self.pos.step, self.progress()) * self.pos.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = self.compute_loss()
        # The loss of the global batch (ranks hold equal shares): a NaN on any rank is a NaN on all,
        # so all of them skip the update and roll back together.
        value = self.dist.all_reduce([loss.item()])[0] / self.dist.world_size
        if not math.isfinite(value):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        self.after_step()
        self.pos.step, self.pos.index = self.pos.step + 1, self.pos.index + 1
        return value

    def _evaluate_and_save(self) -> bool:
        """Evaluate, log, save last (and best if better); True if early stopping says stop."""
        pos = self.pos
        with averaged(self.average):
            val = self.evaluate()
            sample = self.sample_text()
        self.last_val = val
        improved = self.take_if_best(val)
        if improved:
            pos.best_step, pos.evals_since_best = pos.step, 0
            self.best_val = val
        else:
            pos.evals_since_best += 1
        if self.dist.is_main:
            record = {f"val_{k}": v for k, v in val.items() if not isinstance(v, (dict, list))}
            append_metrics(self.run_dir, {"step": pos.step, "seconds": round(pos.elapsed, 2),
                                          "train_loss": self.train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                                          **record, **({"sample": sample} if sample is not None else {})})
            if improved:
                with averaged(self.average):
                    save_checkpoint(self.run_dir / BEST, self.model, self.tokenizer, self.checkpoint_meta())
        self.save_last()
        self._snapshot()
        self._emit("eval", val=val, loss=self.train_loss, sample=sample)
        return self.config.patience is not None and pos.evals_since_best >= self.config.patience

    def _save_due(self) -> bool:
        """Whether a time-based resume point is due: soon after the start, then every ``save_time`` seconds."""
        every = self.config.save_time
        if not every:
            return False
        wait = min(every, FIRST_SAVE_SECONDS) if self._saved_at == 0.0 else every
        return self.pos.elapsed - self._saved_at >= wait

    def run(self) -> RunResult:
        """Train until max steps, max time, early stopping or a stop request; the last state is saved."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.net = self.dist.wrap(self.model, self.device)
        try:
            return self._run_loop()
        finally:
            # DDP holds the process group: let it go now, so that the group's threads end when the
            # session destroys it, not while the interpreter shuts down (an abort in gloo).
            self.net = self.model
            self.threads.restore()

    def _run_loop(self) -> RunResult:
        config, pos = self.config, self.pos
        if pos.step == 0:  # a resumed run restored its RNG state instead
            torch.manual_seed(config.seed + self.dist.rank)  # each rank its own dropout masks
        self.model.train()
        self._snapshot()
        self._emit("start", message=self.headline())
        started = time.perf_counter() - pos.elapsed
        first_step, first_elapsed = pos.step, pos.elapsed
        window_start, window_steps = time.perf_counter(), 0
        stopped = "max_steps"
        while self.max_steps is None or self.pos.step < self.max_steps:
            # Every rank stops (and saves) if any was asked to, and all go by the slowest clock (the schedule
            # depends on it): each takes the same decisions with the same learning rate.
            stop, self.pos.elapsed, save = self.dist.all_reduce(
                [float(self.stop.is_set()), self.pos.elapsed, float(self._save_due())], op="max")
            if stop:
                stopped = "interrupted"
                break
            if config.max_time and self.pos.elapsed >= config.max_time:
                stopped = "max_time"
                break
            if save:
                self.save_last()
            step_started = time.perf_counter()
            loss = self._train_step()
            self.pos.elapsed = time.perf_counter() - started
            self.threads.step_done(time.perf_counter() - step_started, self.pos.elapsed)
            if loss is None:
                self._roll_back()
                continue
            self.train_loss = loss if self.train_loss is None else 0.95 * self.train_loss + 0.05 * loss
            window_steps += 1
            now = time.perf_counter()
            rate = window_steps * self.chars_per_step / max(1e-9, now - window_start)
            if now - window_start > 5.0:  # a sliding measurement window
                window_start, window_steps = now, 0
            self._emit("step", loss=self.train_loss, lr=self.optimizer.param_groups[0]["lr"], chars_per_s=rate)
            if self.pos.step % self.eval_every == 0 and self._evaluate_and_save():
                stopped = "early_stop"
                break
            if config.save_every and self.pos.step % config.save_every == 0:
                self.save_last()
        if stopped == "interrupted":
            self.save_last()  # no extra evaluation: the resumed run must see the same evaluations
        elif self.pos.step % self.eval_every != 0 or not self.last_val:
            self._evaluate_and_save()  # the final state is always evaluated and saved
        seconds = self.pos.elapsed - first_elapsed
        average = (self.pos.step - first_step) * self.chars_per_step / seconds if seconds > 0 else None
        self._emit("end", message=stopped, chars_per_s=average)
        return RunResult(self.run_dir, self.pos.step, self.pos.elapsed, stopped, self.best_val, self.last_val,
                         self.train_loss, self.meta.get("training", {}).get("corpus", ""),
                         self.model.num_parameters())


@contextmanager
def stop_on_signals(stop: threading.Event, dist: Dist | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM ask ``stop`` to end the run after the current step (the loop then saves);
    a second one stops at once (KeyboardInterrupt). Only the main thread can take signals: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    dist = dist or Dist()
    first_signal: list[float] = []

    def request_stop(signum: int, frame: Any) -> None:
        # Under torchrun a Ctrl-C reaches each process twice, from the terminal and from torchrun:
        # there a second signal counts only when it comes more than a second after the first.
        if stop.is_set() and not (dist.enabled and time.monotonic() - first_signal[0] < 1.0):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first_signal.append(time.monotonic())
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_to_end(trainer: TrainLoop) -> RunResult:
    """Run ``trainer`` holding the run's lock (rank 0 writes), stopping cleanly, saved, on Ctrl-C or SIGTERM."""
    with stop_on_signals(trainer.stop, trainer.dist), trainer.dist.on_main(run_lock(trainer.run_dir)):
        return trainer.run()
