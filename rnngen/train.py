"""The language-model training loop. It knows nothing of the terminal: it reports through a callback.

One run directory (see checkpoint.py) holds the best and the last checkpoint and metrics.jsonl.
Resume is exact: the last checkpoint carries the optimizer, the step (hence the schedule), the RNG
states, the data position and the recurrent state carried between windows. Under torchrun the same
loop runs in every process (see distributed.py): each trains on its own lanes of the batch.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (BEST, LAST, append_metrics, load_checkpoint, load_trainer_state, resolve_checkpoint_dir,
                         run_lock, save_checkpoint)
from .config import ModelConfig, TrainConfig, from_dict, to_dict
from .corpora import Corpus, resolve_corpus
from .data import StreamBatches, TokenSplit, tokenize_to_file
from .distributed import Dist, session
from .errors import CheckpointError, InputError, TrainingError
from .model import RNNModel, State, detach_state
from .runtime import autocast, evaluate, resolve_device, use_bf16
from .tokenizers import CharTokenizer, Tokenizer, fit_tokenizer, tokenizer_from_dict

@dataclass
class TrainEvent:
    """What the loop tells its caller: kind is start, step, eval, nan or end."""

    kind: str
    step: int
    max_steps: int
    elapsed: float
    max_time: float | None = None
    loss: float | None = None
    lr: float | None = None
    chars_per_s: float | None = None
    val: dict[str, float] | None = None
    message: str = ""
    sample: str | None = None  # eval: a text sampled from the model as it is now (TrainConfig.sample_length)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    elapsed: float
    stopped: str  # max_steps, max_time, early_stop or interrupted
    best_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    corpus: str = ""
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "steps": self.steps, "seconds": round(self.elapsed, 2),
                "stopped": self.stopped, "train_loss": self.train_loss, "best": self.best_val,
                "last": self.last_val, "corpus": self.corpus, "parameters": self.params}


def lr_at(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` as ``progress`` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: RNNModel, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases, norms and embeddings are not decayed."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=fused)


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


@dataclass
class _Position:
    """Where the loop is; everything in it is saved for an exact resume."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    elapsed: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    lr_scale: float = 1.0
    nan_retries: int = 0


def _rng_key(kind: str, rank: int) -> str:
    """Where a rank's RNG state is saved: rank 0's where a single process keeps its own."""
    return f"rng.{kind}" if rank == 0 else f"rng.{kind}.{rank}"


class Trainer:
    """Trains ``model`` on ``split`` into ``run_dir``; call ``run()`` (holding the run lock).

    With ``dist`` (torchrun), every rank builds its Trainer and calls the same methods in the same
    order: saving, evaluating and stopping involve all ranks, and only rank 0 writes.
    """

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, split: TokenSplit, config: TrainConfig,
                 run_dir: Path, meta: dict[str, Any], device: torch.device,
                 callback: Callable[[TrainEvent], None] | None = None,
                 stop: threading.Event | None = None, dist: Dist | None = None) -> None:
        self.model, self.tokenizer, self.split, self.config = model.to(device), tokenizer, split, config
        self.run_dir, self.meta, self.device = run_dir, meta, device
        self.callback = callback or (lambda event: None)
        self.stop = stop or threading.Event()
        self.dist = dist or Dist()
        self.net: torch.nn.Module = self.model  # what the training step calls: wrapped in DDP by run()
        self.batches = StreamBatches(split.train, config.batch_size, config.seq_len, config.seed,
                                     self.dist.rank, self.dist.world_size)
        self.char_lengths = tokenizer.char_lengths()
        self.optimizer = make_optimizer(model, config, device)
        self.average = WeightAverage(model, config.ema) if config.ema > 0 else None
        self.pos = _Position()
        self.state: State | None = None
        self.last_val: dict[str, float] = {}
        self.best_val: dict[str, float] = {}
        self.train_loss: float | None = None
        train_sample = np.asarray(split.train[: 1 << 20])
        self.bf16 = use_bf16(device, config.precision)
        self.chars_per_token = float(self.char_lengths[train_sample].mean()) if len(train_sample) else 1.0
        # Test hook: inject a NaN loss at these steps, "STEP" on every rank or "STEP@RANK" on one.
        nan_at = [s.strip().split("@") for s in os.environ.get("RNNGEN_TEST_NAN_AT_STEP", "").split(",") if s.strip()]
        self._inject_nan = {int(s[0]) for s in nan_at if len(s) == 1 or int(s[1]) == self.dist.rank}
        self._good: dict[str, Any] | None = None

    # -- saving and restoring -------------------------------------------------------------------
    def _trainer_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What resuming needs, the RNG states and carried state of every rank included (a collective)."""
        groups, tensors = optimizer_to_saved(self.optimizer)
        rngs = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rngs["cuda"] = torch.cuda.get_rng_state(self.device)
        for kind, rng in rngs.items():
            for rank, rank_rng in enumerate(self.dist.gather(rng)):
                tensors[_rng_key(kind, rank)] = rank_rng
        for i, s in enumerate(self.state or ()):
            tensors[f"carry.{i}"] = torch.cat(self.dist.gather(s), dim=1)  # (L, B, H): every lane, as in one process
        if self.average is not None:
            tensors.update(self.average.state())
        state = {"position": vars(self.pos).copy(), "optimizer_groups": groups,
                 "train_config": to_dict(self.config), **self.meta.get("resume", {})}
        return state, tensors

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a saved trainer state (see ``_trainer_state``)."""
        self.pos = _Position(**state["position"])
        optimizer_from_saved(self.optimizer, state["optimizer_groups"], tensors, self.device)
        rank = self.dist.rank
        if _rng_key("cpu", rank) in tensors:
            torch.set_rng_state(tensors[_rng_key("cpu", rank)])
        else:  # resumed with more processes than the run had: this rank starts a stream of its own
            torch.manual_seed(self.config.seed + rank)
        if self.device.type == "cuda" and _rng_key("cuda", rank) in tensors:
            torch.cuda.set_rng_state(tensors[_rng_key("cuda", rank)], self.device)
        carry = [tensors[k][:, self.batches.lanes].to(self.device) for k in sorted(tensors) if k.startswith("carry.")]
        self.state = tuple(carry) if carry else None
        if self.average is not None:
            self.average.load(tensors, self.pos.step)

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"training": {**self.meta.get("training", {}), "step": self.pos.step,
                             "seconds": round(self.pos.elapsed, 1), "best_step": self.pos.best_step,
                             "best_val": self.best_val, "last_val": self.last_val,
                             "train_config": to_dict(self.config)}}

    def save_last(self) -> None:
        state, tensors = self._trainer_state()
        if self.dist.is_main:
            save_checkpoint(self.run_dir / LAST, self.model, self.tokenizer, self._checkpoint_meta(), state, tensors)

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

    # -- the loop -----------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        self.callback(TrainEvent(kind, self.pos.step, self.config.max_steps, self.pos.elapsed,
                                 self.config.max_time, **fields))

    def _progress(self) -> float:
        by_steps = self.pos.step / self.config.max_steps
        by_time = self.pos.elapsed / self.config.max_time if self.config.max_time else 0.0
        return max(by_steps, by_time)

    def _train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None if it was not finite."""
        pos, config = self.pos, self.config
        if pos.index >= self.batches.steps_in_epoch(pos.epoch):
            pos.epoch, pos.index, self.state = pos.epoch + 1, 0, None
        x, y = self.batches.batch(pos.epoch, pos.index)
        if config.state_reset and self.state is not None:
            # Some windows start from nothing, as sampling without a prompt and fresh-state scoring do;
            # a model that only ever continues a carried state reads the first characters badly.
            keep = ~self.batches.fresh_lanes(pos.epoch, pos.index, config.state_reset)
            self.state = tuple(s * keep.to(s).view(1, -1, 1) for s in self.state)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        lr = lr_at(config, pos.step, self._progress()) * pos.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.bf16):
            logits, state = self.net(x, self.state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if pos.step in self._inject_nan:
            self._inject_nan.discard(pos.step)
            loss = loss * float("nan")
        # The loss of the global batch (ranks hold equal shares): a NaN on any rank is a NaN on all,
        # so all of them skip the update and roll back together.
        value = self.dist.all_reduce([loss.item()])[0] / self.dist.world_size
        if not math.isfinite(value):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        self.state = detach_state(state)
        pos.step, pos.index = pos.step + 1, pos.index + 1
        return value

    def _evaluate_and_save(self) -> bool:
        """Evaluate, log, save last (and best if better); True if early stopping says stop."""
        pos, config = self.pos, self.config
        with averaged(self.average):
            val = evaluate(self.model, self.split.val, self.char_lengths, self.device,
                           max_tokens=config.eval_max_tokens, dist=self.dist)
            sample = self._sample() if self.dist.is_main and config.sample_length else None
        self.last_val = val
        improved = math.isfinite(val["loss"]) and val["loss"] < pos.best_loss
        if improved:
            pos.best_loss, pos.best_step, pos.evals_since_best = val["loss"], pos.step, 0
            self.best_val = val
        else:
            pos.evals_since_best += 1
        if self.dist.is_main:
            append_metrics(self.run_dir, {"step": pos.step, "seconds": round(pos.elapsed, 2),
                                          "train_loss": self.train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                                          **{f"val_{k}": v for k, v in val.items()},
                                          **({"sample": sample} if sample is not None else {})})
            if improved:
                with averaged(self.average):
                    save_checkpoint(self.run_dir / BEST, self.model, self.tokenizer, self._checkpoint_meta())
        self.save_last()
        self._snapshot()
        self._emit("eval", val=val, loss=self.train_loss, sample=sample)
        return config.patience is not None and pos.evals_since_best >= config.patience

    def _sample(self) -> str:
        """``sample_length`` tokens from the model as it is now, at temperature 0.8 and the run's seed (the
        same random numbers at every evaluation: what changes is the model). The sampler draws from its own
        random stream, so a run with samples trains exactly as one without."""
        from .generate import Generator

        was_training = self.model.training
        self.model.eval()
        try:
            # The plain path (one model call per token): the fast steps prepare the weights, which change.
            generator = Generator(self.model, self.tokenizer, {}, self.run_dir, fast=False)
            return generator.sample(length=self.config.sample_length, temperature=0.8, seed=self.config.seed)
        finally:
            self.model.train(was_training)

    def run(self) -> TrainResult:
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

    def _run_loop(self) -> TrainResult:
        config, pos = self.config, self.pos
        if pos.step == 0:  # a resumed run restored its RNG state instead
            torch.manual_seed(config.seed + self.dist.rank)  # each rank its own dropout masks
        self.model.train()
        self._snapshot()
        self._emit("start")
        started = time.perf_counter() - pos.elapsed
        window_start, window_tokens = time.perf_counter(), 0
        stopped = "max_steps"
        while self.pos.step < config.max_steps:
            # Every rank stops if any was asked to, and all go by the slowest clock (the schedule
            # depends on it): each takes the same decisions with the same learning rate.
            stop, self.pos.elapsed = self.dist.all_reduce([float(self.stop.is_set()), self.pos.elapsed], op="max")
            if stop:
                stopped = "interrupted"
                break
            if config.max_time and self.pos.elapsed >= config.max_time:
                stopped = "max_time"
                break
            loss = self._train_step()
            self.pos.elapsed = time.perf_counter() - started
            if loss is None:
                self._roll_back()
                continue
            self.train_loss = loss if self.train_loss is None else 0.95 * self.train_loss + 0.05 * loss
            window_tokens += config.batch_size * config.seq_len
            now = time.perf_counter()
            rate = window_tokens * self.chars_per_token / max(1e-9, now - window_start)
            if now - window_start > 5.0:  # a sliding measurement window
                window_start, window_tokens = now, 0
            self._emit("step", loss=self.train_loss, lr=self.optimizer.param_groups[0]["lr"], chars_per_s=rate)
            if self.pos.step % config.eval_every == 0 and self._evaluate_and_save():
                stopped = "early_stop"
                break
            if config.save_every and self.pos.step % config.save_every == 0:
                self.save_last()
        if stopped == "interrupted":
            self.save_last()  # no extra evaluation: the resumed run must see the same evaluations
        elif self.pos.step % config.eval_every != 0 or not self.last_val:
            self._evaluate_and_save()  # the final state is always evaluated and saved
        self._emit("end", message=stopped)
        return TrainResult(self.run_dir, self.pos.step, self.pos.elapsed, stopped, self.best_val, self.last_val,
                           self.train_loss, self.meta.get("training", {}).get("corpus", ""),
                           self.model.num_parameters())


# -- assembling a run from options ----------------------------------------------------------------

MODEL_FIELDS = {"arch", "emb_dim", "hidden", "layers", "dropout", "emb_dropout", "weight_drop", "tie_weights"}
TOKENIZER_FIELDS = {"tokenizer", "vocab_size", "min_char_count"}


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    train_fields = set(TrainConfig.__dataclass_fields__)
    unknown = set(options) - MODEL_FIELDS - TOKENIZER_FIELDS - train_fields
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    pick = lambda names: {k: v for k, v in options.items() if k in names and v is not None}  # noqa: E731
    return pick(MODEL_FIELDS), pick(TOKENIZER_FIELDS), pick(train_fields)


def has_run(run_dir: Path) -> bool:
    try:
        resolve_checkpoint_dir(run_dir)
        return True
    except CheckpointError:
        return False


@dataclass(frozen=True)
class _RunData:
    """What rank 0 works out from the corpus (and, resuming, from the run); every rank builds on it."""

    corpus: Corpus
    fingerprint: str
    tokenizer: dict[str, Any]
    config: TrainConfig
    meta: dict[str, Any]
    best_val: dict[str, float] = field(default_factory=dict)  # resuming: the best validation so far
    # Fine-tuning: the configuration the base checkpoint (meta's training.base) is adapted to.
    base_model: dict[str, Any] | None = None


def prepare_run(sources: list[str], out: str | Path, resume: bool = False, encoding: str = "utf-8",
                errors: str = "strict", callback: Callable[[TrainEvent], None] | None = None,
                stop: threading.Event | None = None, dist: Dist | None = None, base: str | None = None,
                **options: Any) -> Trainer:
    """Build a Trainer for a new run (from scratch, or fine-tuning the checkpoint ``base`` on the
    corpus), or for resuming the run in ``out``.

    With ``dist`` (torchrun), rank 0 reads the corpus (fits the tokenizer, hashes the corpus and
    tokenizes it into the cache) while the others wait; then every rank builds its Trainer from
    that. An error on any rank is raised on every rank.
    """
    dist = dist or Dist()
    run_dir = Path(out)
    model_opts, tok_opts, train_opts = _split_options(options)
    if resume and base:
        raise InputError("--from starts a new run and --resume continues one: drop --from to resume "
                         "(the run remembers its base)")
    if resume:
        data = dist.from_main(lambda: _resume_data(sources, run_dir, encoding, errors, train_opts))
    else:
        data = dist.from_main(lambda: _new_run_data(sources, run_dir, encoding, errors, tok_opts, train_opts,
                                                    base, model_opts))
    return dist.agree(lambda: _build_trainer(data, run_dir, resume, model_opts, callback, stop, dist))


def _new_run_data(sources: list[str], run_dir: Path, encoding: str, errors: str, tok_opts: dict[str, Any],
                  train_opts: dict[str, Any], base: str | None = None,
                  model_opts: dict[str, Any] | None = None) -> _RunData:
    if has_run(run_dir):
        raise InputError(f"{run_dir} already holds a training run; pass --resume to continue it, "
                         "or choose another --out")
    config = TrainConfig(**train_opts)
    corpus = resolve_corpus(sources, encoding, errors)
    resolve_device(config.device)  # refuse a missing device before reading the corpus
    kind = tok_opts.get("tokenizer", "char")
    if kind not in ("char", "bpe", "unigram"):
        raise InputError(f"unknown --tokenizer {kind!r}: use char, bpe or unigram")
    vocab_size = tok_opts.get("vocab_size", 2000)
    min_char_count = tok_opts.get("min_char_count", 1)
    if vocab_size < 2 or min_char_count < 1:
        raise InputError("--vocab-size must be at least 2 and --min-char-count at least 1")
    fine_tune: dict[str, Any] = {}
    base_model = None
    if base:
        tokenizer, base_model, fine_tune = fine_tune_base(base, corpus, tok_opts, model_opts or {})
    else:
        tokenizer = fit_tokenizer(corpus.chunks(), kind, vocab_size, min_char_count)
    fingerprint = corpus.fingerprint()  # hashing reads the whole corpus: once per run
    tokens = tokenize_to_file(corpus, tokenizer, fingerprint=fingerprint)
    if base:
        # In slices: the token file may be larger than memory, and so would a comparison of it all at once.
        fine_tune["unknown_tokens"] = sum(int(np.count_nonzero(tokens[i:i + (1 << 24)] == tokenizer.unk_id))
                                          for i in range(0, len(tokens), 1 << 24))
    meta = {"training": {"corpus": corpus.describe(), "tokens": len(tokens), **fine_tune},
            "resume": {"corpus": {"paths": [str(p.resolve()) for p in corpus.paths], "encoding": encoding,
                                  "errors": errors, "fingerprint": fingerprint}}}
    return _RunData(corpus, fingerprint, tokenizer.to_dict(), config, meta,
                    base_model=to_dict(base_model) if base_model else None)


SHAPE_FIELDS = MODEL_FIELDS - {"dropout", "emb_dropout", "weight_drop"}  # what fine-tuning cannot change


def load_base(base: str, model_opts: dict[str, Any],
              tok_opts: dict[str, Any]) -> tuple[RNNModel, Tokenizer, Path]:
    """The checkpoint ``base`` that ``--from`` fine-tunes (on the CPU), after refusing options that would
    change its network or vocabulary (options equal to the base's pass) and a bidirectional encoder."""
    model, tokenizer, _, directory = load_checkpoint(base, "cpu")
    base_shape = {**{k: getattr(model.config, k) for k in SHAPE_FIELDS}, "tokenizer": tokenizer.kind,
                  "vocab_size": tokenizer.vocab_size}
    shaping = sorted(f"--{k.replace('_', '-')} {v}" for k, v in {**model_opts, **tok_opts}.items()
                     if k in base_shape and v != base_shape[k])
    if shaping:
        raise InputError(f"{', '.join(shaping)} would change the network or vocabulary of {base}, which --from "
                         "fine-tunes as it is; drop them, or train from scratch without --from")
    if model.config.bidirectional:
        raise InputError(f"{base} has a bidirectional encoder, which cannot be a language model; "
                         "fine-tune a unidirectional one")
    return model, tokenizer, directory


def fine_tune_base(base: str, corpus: Corpus, tok_opts: dict[str, Any],
                   model_opts: dict[str, Any]) -> tuple[Tokenizer, ModelConfig, dict[str, Any]]:
    """The tokenizer and model configuration for fine-tuning the language model ``base`` on ``corpus``.

    The base's network is kept (options that would change it are refused); dropout rates may change. A
    character vocabulary grows by the corpus's characters that the base never saw (those seen at least
    --min-char-count times), so the fine-tuned model can read and write them (rarer ones are read as
    <unk>); a subword vocabulary spells them in UTF-8 byte pieces. Classification heads and label tokens
    are not carried over: the result is a language model.
    Returns also what the run's config.json records of it (``base``, ``added_characters``).
    """
    model, tokenizer, directory = load_base(base, model_opts, tok_opts)
    added = ""
    if isinstance(tokenizer, CharTokenizer):
        seen = CharTokenizer.fit(corpus.chunks(), tok_opts.get("min_char_count", 1)).chars
        added = "".join(c for c in seen if tokenizer.encode(c)[0] == tokenizer.unk_id)
        tokenizer = CharTokenizer(tokenizer.chars + list(added))
    config = replace(model.config, **{k: v for k, v in model_opts.items() if k not in SHAPE_FIELDS},
                     vocab_size=tokenizer.vocab_size, label_tokens=())
    return tokenizer, config, {"base": str(directory), "added_characters": added}


def load_base_model(data: _RunData) -> RNNModel:
    """The base checkpoint's network, adapted to the fine-tuning run (see ``fine_tune_base``).

    Every rank loads it here (rank 0 a second time): only the configuration travels between ranks."""
    model, _, _, _ = load_checkpoint(data.meta["training"]["base"], "cpu")
    model.heads.clear()
    return model.adapted(from_dict(ModelConfig, data.base_model or {}))


RUN_FACTS = ("corpus", "tokens", "base", "added_characters", "unknown_tokens")  # what a resumed run keeps saying


def _resume_data(sources: list[str], run_dir: Path, encoding: str, errors: str,
                 overrides: dict[str, Any]) -> _RunData:
    last = run_dir / LAST
    if not (last / "config.json").is_file():
        raise InputError(f"nothing to resume in {run_dir} (no {LAST}/ checkpoint); start a new run instead")
    state, _ = load_trainer_state(last)
    saved = state["corpus"]
    corpus = (resolve_corpus(sources, encoding, errors) if sources
              else Corpus(tuple(Path(p) for p in saved["paths"]), saved["encoding"], saved["errors"]))
    for p in corpus.paths:
        if not p.is_file():
            raise InputError(f"the corpus of this run is gone ({p}); pass it again: rnngen train FILE --resume")
    fingerprint = corpus.fingerprint()
    if fingerprint != saved["fingerprint"]:
        raise InputError("the corpus differs from the one this run was trained on; resume with the same "
                         "files, or start a new run with another --out")
    saved_config = {"state_reset": 0.0, **state["train_config"]}  # runs from before --state-reset carried always
    config = replace(from_dict(TrainConfig, saved_config), **overrides)
    resolve_device(config.device)
    _, tokenizer, ckpt_config, _ = load_checkpoint(last)
    tokenize_to_file(corpus, tokenizer, fingerprint=fingerprint)
    training = ckpt_config.get("training", {})
    meta = {"training": {k: v for k, v in training.items() if k in RUN_FACTS}, "resume": {"corpus": saved}}
    return _RunData(corpus, fingerprint, tokenizer.to_dict(), config, meta, dict(training.get("best_val") or {}))


def _build_trainer(data: _RunData, run_dir: Path, resume: bool, model_opts: dict[str, Any],
                   callback: Callable[[TrainEvent], None] | None, stop: threading.Event | None,
                   dist: Dist) -> Trainer:
    """On every rank: open the token cache rank 0 filled, then build (or load) the model and its Trainer."""
    config = data.config
    tokenizer = tokenizer_from_dict(data.tokenizer)
    tokens = tokenize_to_file(data.corpus, tokenizer, fingerprint=data.fingerprint)
    expected = data.meta["training"].get("tokens", len(tokens))
    if len(tokens) != expected:
        raise InputError(f"the corpus reads as {len(tokens):,} tokens on this machine but {expected:,} on rank 0; "
                         "every machine needs the same corpus files")
    split = TokenSplit.from_tokens(tokens, config.val_fraction)
    device = dist.device(resolve_device(config.device))
    meta = data.meta
    if not resume:
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = (load_base_model(data) if data.base_model
                 else RNNModel(ModelConfig(vocab_size=tokenizer.vocab_size, **model_opts)))
        return Trainer(model, tokenizer, split, config, run_dir, meta, device, callback, stop, dist)
    state, tensors = load_trainer_state(run_dir / LAST)
    model, _, _, _ = load_checkpoint(run_dir / LAST, device)
    trainer = Trainer(model, tokenizer, split, config, run_dir, meta, device, callback, stop, dist)
    trainer.restore(state, tensors)
    trainer.best_val = data.best_val
    return trainer


def train_from_options(sources: list[str], out: str | Path, **options: Any) -> TrainResult:
    """Python API entry point: prepare the run (new or resumed) and train it to the end.

    Under torchrun every process calls it and they train together (see distributed.py).
    """
    with session() as dist:
        trainer = prepare_run(sources, out, dist=dist, **options)
        with dist.on_main(run_lock(trainer.run_dir)):  # rank 0 holds the lock: it is the one that writes
            return trainer.run()
