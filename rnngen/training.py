"""The language-model trainer, and how a run is assembled from a corpus and options.

One run directory (see checkpoint.py) holds the best and the last checkpoint and metrics.jsonl.
Resume is exact: the last checkpoint carries the optimizer, the step (hence the schedule), the RNG
states, the data position and the recurrent state carried between windows. Under torchrun the same
loop runs in every process (see distributed.py): each trains on its own lanes of the batch. The loop
itself (budget, schedule, evaluation, saving, stopping) is loop.py's, shared with the classifier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import LAST, load_checkpoint, load_trainer_state
from .config import SHAPE_FIELDS, ModelConfig, TokenizerConfig, TrainConfig, from_dict, pick, split_options, to_dict
from .corpora import Corpus, resolve_corpus
from .data import StreamBatches, TokenSplit, tokenize_to_file
from .distributed import Dist, session
from .errors import InputError
from .choose import Choice, CorpusStats, choose_model, choose_recipe, choose_tokenizer, describe, probe_steps_per_second
from .generate import Sampler
from .loop import RunResult, TrainEvent, TrainLoop, refuse_existing_run, resume_point, run_to_end
from .model import RNNModel, detach_state
from .runtime import autocast, evaluate, resolve_device
from .tokenizers import CharTokenizer, Tokenizer, fit_tokenizer, tokenizer_from_dict

SAMPLE_TEMPERATURE = 0.8  # of the samples shown at evaluations
PLAIN_STEPS = 1000  # --preset plain with neither --max-steps nor --max-time


class Trainer(TrainLoop):
    """Trains a language model on ``split`` into ``run_dir``: windows of the corpus read as parallel lanes,
    the recurrent state carried from one window to the next (truncated backpropagation through time)."""

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, split: TokenSplit, config: TrainConfig,
                 run_dir: Path, meta: dict[str, Any], device: torch.device,
                 callback: Callable[[TrainEvent], None] | None = None,
                 stop: threading.Event | None = None, dist: Dist | None = None, resumed: bool = False) -> None:
        super().__init__(model, tokenizer, config, run_dir, meta, device, callback, stop, dist)
        self.config: TrainConfig = config
        self.split, self.resumed = split, resumed
        self.batches = StreamBatches(split.train, config.batch_size, config.seq_len, config.seed,
                                     self.dist.rank, self.dist.world_size)
        self.char_lengths = tokenizer.char_lengths()
        train_sample = np.asarray(split.train[: 1 << 20])
        chars_per_token = float(self.char_lengths[train_sample].mean()) if len(train_sample) else 1.0
        self.chars_per_step = config.batch_size * config.seq_len * chars_per_token
        self._next_state: tuple[torch.Tensor, ...] | None = None

    def headline(self) -> str:
        processes = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
        what = self.meta.get("training", {}).get("corpus", "")
        return (f"{self.said_choice(self.resumed)}{'resuming at step ' + str(self.pos.step) if self.resumed else 'training'} on {what}: "
                f"{self.model.num_parameters():,} parameters, {len(self.split.tokens):,} tokens, device "
                f"{self.device.type}{processes}, {'bf16' if self.bf16 else 'fp32'}, into {self.run_dir}")

    def compute_loss(self) -> torch.Tensor:
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
        with autocast(self.device, self.bf16):
            logits, self._next_state = self.net(x, self.state)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def after_step(self) -> None:
        assert self._next_state is not None
        self.state = detach_state(self._next_state)

    def evaluate(self) -> dict[str, Any]:
        return evaluate(self.model, self.split.val, self.char_lengths, self.device,
                        max_tokens=self.config.eval_max_tokens, dist=self.dist)

    def take_if_best(self, val: dict[str, Any]) -> bool:
        if not (np.isfinite(val["loss"]) and val["loss"] < self.pos.best_loss):
            return False
        self.pos.best_loss = val["loss"]
        return True

    def sample_text(self) -> str | None:
        """``sample_length`` tokens from the model as it is now, at temperature 0.8 and the run's seed (the
        same random numbers at every evaluation: what changes is the model). The sampler draws from its own
        random stream, so a run with samples trains exactly as one without."""
        if not (self.dist.is_main and self.config.sample_length):
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            # The plain path (one model call per token): the fast steps prepare the weights, which change.
            sampler = Sampler(self.model, self.tokenizer, fast=False)
            return sampler.sample(length=self.config.sample_length, temperature=SAMPLE_TEMPERATURE,
                                  seed=self.config.seed)
        finally:
            self.model.train(was_training)

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # (L, B, H): every lane, as in one process
        return {}, {f"carry.{i}": torch.cat(self.dist.gather(s), dim=1) for i, s in enumerate(self.state or ())}

    def restore_extra(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        carry = [tensors[k][:, self.batches.lanes].to(self.device) for k in sorted(tensors) if k.startswith("carry.")]
        self.state = tuple(carry) if carry else None

    def extra_meta(self) -> dict[str, Any]:
        return {"training": {"train_config": to_dict(self.config)}}


# -- assembling a run from options ----------------------------------------------------------------------

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
    model: dict[str, Any] = field(default_factory=dict)  # a new model's options: given, then chosen


def prepare_run(sources: list[str], out: str | Path, resume: bool = False, encoding: str = "utf-8",
                errors: str = "strict", callback: Callable[[TrainEvent], None] | None = None,
                stop: threading.Event | None = None, dist: Dist | None = None, base: str | None = None,
                **options: Any) -> Trainer:
    """Build a Trainer for a new run (from scratch, or fine-tuning the checkpoint ``base`` on the
    corpus), or for resuming the run in ``out``. ``options``: the fields of ModelConfig, TokenizerConfig
    and TrainConfig.

    With ``dist`` (torchrun), rank 0 reads the corpus (fits the tokenizer, hashes the corpus and
    tokenizes it into the cache) while the others wait; then every rank builds its Trainer from
    that. An error on any rank is raised on every rank.
    """
    dist = dist or Dist()
    run_dir = Path(out)
    # TokenizerConfig first: its vocab_size is the one a user sets (the model's follows from the tokenizer).
    tok_opts, model_opts, train_opts = split_options(options, TokenizerConfig, ModelConfig, TrainConfig,
                                                     what="training option")
    if model_opts.get("bidirectional"):
        raise InputError("a bidirectional encoder cannot be a language model; use it for `rnngen classify train`")
    if resume and base:
        raise InputError("--from starts a new run and --resume continues one: drop --from to resume "
                         "(the run remembers its base)")
    if resume:
        data = dist.from_main(lambda: _resume_data(sources, run_dir, encoding, errors, train_opts))
    else:
        data = dist.from_main(lambda: _new_run_data(sources, run_dir, encoding, errors, tok_opts, train_opts,
                                                    base, model_opts))
    return dist.agree(lambda: _build_trainer(data, run_dir, resume, callback, stop, dist))


def _new_run_data(sources: list[str], run_dir: Path, encoding: str, errors: str, tok_opts: dict[str, Any],
                  train_opts: dict[str, Any], base: str | None = None,
                  model_opts: dict[str, Any] | None = None) -> _RunData:
    refuse_existing_run(run_dir)
    model_opts = dict(model_opts or {})
    config = TrainConfig(**train_opts)  # the options given, checked before the corpus is read
    TokenizerConfig(**tok_opts)
    corpus = resolve_corpus(sources, encoding, errors)
    device = resolve_device(config.device)  # refuse a missing device before reading the corpus
    auto = config.preset == "auto" and not base  # fine-tuning keeps its base's network and tokenizer
    given = {**tok_opts, **model_opts, **train_opts}
    choice = Choice()
    stats = CorpusStats.of(corpus) if auto else None
    if stats is not None:
        choose_tokenizer(stats, given, choice)
        tok_opts = {**pick(choice.options, TokenizerConfig), **tok_opts}
    tok_config = TokenizerConfig(**tok_opts)
    fine_tune: dict[str, Any] = {}
    base_model = None
    if base:
        tokenizer, base_model, fine_tune = fine_tune_base(base, corpus, tok_opts, model_opts)
    else:
        tokenizer = fit_tokenizer(corpus.chunks(), tok_config.tokenizer, tok_config.vocab_size,
                                  tok_config.min_char_count)
    fingerprint = corpus.fingerprint()  # hashing reads the whole corpus: once per run
    tokens = tokenize_to_file(corpus, tokenizer, fingerprint=fingerprint)
    if base:
        # In slices: the token file may be larger than memory, and so would a comparison of it all at once.
        fine_tune["unknown_tokens"] = sum(int(np.count_nonzero(tokens[i:i + (1 << 24)] == tokenizer.unk_id))
                                          for i in range(0, len(tokens), 1 << 24))
    train_tokens = int(len(tokens) * (1 - config.val_fraction))
    if stats is not None:
        def sized(layers: int, hidden: int) -> ModelConfig:
            return ModelConfig(vocab_size=tokenizer.vocab_size, **{**model_opts, "layers": layers, "hidden": hidden})

        def speed_of(layers: int, hidden: int, batch: int) -> float:
            return probe_steps_per_second(sized(layers, hidden), replace(config, batch_size=batch), device)

        speed = choose_model(device, given, choice, config.max_time, config.batch_size, config.seq_len, speed_of,
                             lambda layers, hidden: RNNModel(sized(layers, hidden)).num_parameters())
        # The recipe counts passes and evaluation tokens with the batch that will be trained.
        config = replace(config, batch_size=choice.options.get("batch_size", config.batch_size))
        expected, _ = choose_recipe(config, given, train_tokens, speed, choice)
        model_opts = {**pick(choice.options, ModelConfig), **model_opts}
        config = replace(config, **{**pick(choice.options, TrainConfig), **train_opts})
        choice.line = describe({"chars": stats.chars, **to_dict(ModelConfig(vocab_size=tokenizer.vocab_size,
                                                                                 **model_opts)),
                                "tokenizer": tokenizer.kind}, stats, config, expected, speed, device)
    elif config.max_steps is None and config.max_time is None:
        config = replace(config, max_steps=PLAIN_STEPS)
    meta = {"training": {"corpus": corpus.describe(), "tokens": len(tokens), **fine_tune,
                         **({"chosen": choice.to_dict()} if choice.line else {})},
            "resume": {"corpus": {"paths": [str(p.resolve()) for p in corpus.paths], "encoding": encoding,
                                  "errors": errors, "fingerprint": fingerprint}}}
    return _RunData(corpus, fingerprint, tokenizer.to_dict(), config, meta,
                    base_model=to_dict(base_model) if base_model else None, model=model_opts)


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


RUN_FACTS = ("corpus", "tokens", "base", "added_characters", "unknown_tokens", "chosen")  # what a resumed run keeps saying


def _resume_data(sources: list[str], run_dir: Path, encoding: str, errors: str,
                 overrides: dict[str, Any]) -> _RunData:
    state, _ = load_trainer_state(resume_point(run_dir))
    if "train_config" not in state:
        raise InputError(f"{run_dir} is a classifier run; resume it with `rnngen classify train --resume`")
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
    _, tokenizer, ckpt_config, _ = load_checkpoint(run_dir / LAST)
    tokenize_to_file(corpus, tokenizer, fingerprint=fingerprint)
    training = ckpt_config.get("training", {})
    meta = {"training": {k: v for k, v in training.items() if k in RUN_FACTS}, "resume": {"corpus": saved}}
    return _RunData(corpus, fingerprint, tokenizer.to_dict(), config, meta, dict(training.get("best_val") or {}))


def _build_trainer(data: _RunData, run_dir: Path, resume: bool, callback: Callable[[TrainEvent], None] | None, stop: threading.Event | None,
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
                 else RNNModel(ModelConfig(vocab_size=tokenizer.vocab_size, **data.model)))
        return Trainer(model, tokenizer, split, config, run_dir, meta, device, callback, stop, dist)
    state, tensors = load_trainer_state(run_dir / LAST)
    model, _, _, _ = load_checkpoint(run_dir / LAST, device)
    trainer = Trainer(model, tokenizer, split, config, run_dir, meta, device, callback, stop, dist, resumed=True)
    trainer.restore(state, tensors)
    trainer.best_val = data.best_val
    return trainer


def train_from_options(sources: list[str], out: str | Path, **options: Any) -> RunResult:
    """Python API entry point: prepare the run (new or resumed) and train it to the end. Ctrl-C or SIGTERM
    stop it after saving (``stopped == "interrupted"``), as in the CLI.

    Under torchrun every process calls it and they train together (see distributed.py).
    """
    with session() as dist:
        return run_to_end(prepare_run(sources, out, dist=dist, **options))
