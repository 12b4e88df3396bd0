"""Sequence classification on the shared encoder, trained from scratch or fine-tuned from a language model.

The same run keeps the language-model head alive: an auxiliary LM loss on the labelled texts, each
prefixed with its label's token, so the checkpoint still generates, and can generate *for a label*::

    classification input:  \\n  t1 t2 ... tn              -> pooled encoder states -> class
    LM input / targets:     <label> t1 ... tn  /  t1 ... tn \\n

Like LM training, it knows nothing of the terminal: it reports through a callback, writes best/ (highest
validation accuracy), last/ (with the state for an exact --resume) and metrics.jsonl into the run directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, load_trainer_state
from .choose import Choice, LabelledStats, choose_classifier, describe_classifier
from .config import VOTE_GRID, ClassifyConfig, ModelConfig, TokenizerConfig, from_dict, pick, split_options, to_dict
from .data import mixed_seed
from .errors import InputError
from .labelled import LabelledData, ReadConfig, read_labelled, stratified_split
from .loop import RunResult, TrainEvent, TrainLoop, refuse_existing_run, resume_point, run_to_end
from .model import CHAR_NGRAMS, Bag, ClassifierHead, RNNModel, bag_of_ngrams
from .runtime import LN2, autocast, resolve_device
from .tokenizers import Tokenizer, fit_tokenizer
from .training import load_base

# -- turning texts into padded batches ----------------------------------------------------------------

def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What a classified text is read after: a newline, as if a line of the corpus were beginning."""
    ids = [int(i) for i in tokenizer.encode("\n")]
    return ids if ids and ids[0] != tokenizer.unk_id else []


NgramBag = tuple[np.ndarray, np.ndarray]  # one text's hashed n-gram buckets and their counts (model.bag_of_ngrams)


@dataclass
class Encoded:
    """Token sequences of a labelled set: classifier inputs, LM inputs (label first), class indices, and the
    bags of n-grams of the whole texts where the classifier reads them."""

    inputs: list[np.ndarray]
    lm_inputs: list[np.ndarray]
    targets: np.ndarray
    unknown: int = 0  # characters the tokenizer could not represent
    bags: list[NgramBag] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class ClassifierInputs:
    """What the classifier reads of some texts: start token + each text's first tokens, and (where the head
    reads them) the bag of n-grams of each whole text."""

    seqs: list[np.ndarray]
    bags: list[NgramBag] | None
    unknown: int = 0  # characters the tokenizer could not represent


def char_ngrams_for(tokenizer: Tokenizer, ngrams: int) -> int:
    """The character n-grams a new head's bag holds beside its token n-grams: CHAR_NGRAMS for subword models
    (their tokens are words and pieces of words), none for character models (their tokens are characters)."""
    return CHAR_NGRAMS if ngrams and tokenizer.kind != "char" else 0


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int, ngrams: int = 0,
                 char_ngrams: int = 0) -> ClassifierInputs:
    """The classifier's inputs for ``texts``: the first ``max_len`` tokens, and bags of 1- to ``ngrams``-grams
    of tokens (and of 1- to ``char_ngrams``-grams of characters)."""
    head = np.asarray(start_ids(tokenizer), dtype=np.int64)
    seqs, bags, unknown = [], [], 0
    for text in texts:
        whole = np.asarray(tokenizer.encode(text), dtype=np.int64)
        ids = whole[: max_len]
        seqs.append(np.concatenate([head, ids]) if len(ids) else np.concatenate([head, [tokenizer.unk_id]]))
        if ngrams:  # of the lower-cased text, as TF-IDF baselines read it: "Stocks" in a title is "stocks"
            lower = text.lower()
            bags.append(bag_of_ngrams(whole if lower == text else np.asarray(tokenizer.encode(lower), np.int64),
                                      ngrams, lower, char_ngrams))
        unknown += tokenizer.count_unknown(text)
    return ClassifierInputs(seqs, bags if ngrams else None, unknown)


def encode_data(data: LabelledData, tokenizer: Tokenizer, model_config: ModelConfig, max_len: int,
                head: ClassifierHead) -> Encoded:
    """What the trainer reads of ``data``: the classifier's inputs for ``head``, the LM texts, the targets."""
    read = encode_texts(tokenizer, data.texts, max_len, head.ngrams, head.char_ngrams)
    inputs = read.seqs
    end = start_ids(tokenizer)
    skip = len(end)  # the classifier input starts with the newline; the LM input starts with the label
    lm_inputs = []
    if model_config.label_tokens:
        for seq, label in zip(inputs, data.labels):
            lm_inputs.append(np.concatenate([[model_config.label_id(label)], seq[skip:], end]))
    index = {c: i for i, c in enumerate(head.classes)}
    return Encoded(inputs, lm_inputs, np.array([index[label] for label in data.labels]), read.unknown, read.bags)


def pad(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) token ids and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return tokens, lengths


def pad_bags(bags: Sequence[NgramBag]) -> Bag:
    """One batch of bags as EmbeddingBag takes them: all bucket ids, each text's offset, all counts."""
    sizes = [len(ids) for ids, _ in bags]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), dtype=torch.long)
    return (torch.from_numpy(np.concatenate([ids for ids, _ in bags])), offsets,
            torch.from_numpy(np.concatenate([counts for _, counts in bags])))


def drop_tokens(tokens: torch.Tensor, p: float, keep: int, unk_id: int) -> torch.Tensor:
    """Word dropout: each token after the first ``keep`` (the start) becomes ``unk_id`` with probability
    ``p`` (from torch's generator, whose state a checkpoint keeps), so no single token decides the label."""
    dropped = torch.rand(tokens.shape) < p
    dropped[:, :keep] = False
    return tokens.masked_fill(dropped, unk_id)


def length_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of an epoch: shuffled, then sorted by length within pools of 50 batches (little padding).

    Fixed by (seed, epoch), so a resumed run sees the batches the uninterrupted run would have seen.
    """
    rng = np.random.default_rng(mixed_seed(seed, epoch))
    order = rng.permutation(len(lengths))
    sizes = np.asarray(lengths)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start: start + pool]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# -- metrics --------------------------------------------------------------------------------------------

def classification_metrics(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = truth)."""
    k = len(classes)
    confusion = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(k), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(k), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = confusion.sum(1) > 0  # macro-F1 over the classes that occur
    return {"accuracy": float(tp.sum() / max(1, len(truth))),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(confusion[i].sum())} for i, c in enumerate(classes)},
            "confusion": confusion.tolist(), "classes": list(classes), "examples": int(len(truth))}


@torch.no_grad()
def predict_parts(model: RNNModel, seqs: Sequence[np.ndarray], device: torch.device, batch_size: int = 64,
                  bf16: bool = False, bags: Sequence[NgramBag] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The class logits (N, C) of the recurrent part and of the bag of n-grams (None without bags) for
    encoded inputs, in their order (batched by length for speed)."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    shape = (len(seqs), len(model.classifier.classes))  # type: ignore[union-attr]
    recurrent, bag_logits = torch.empty(shape), torch.empty(shape) if bags is not None else None
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        tokens, lengths = pad([seqs[i] for i in idx])
        bag = pad_bags([bags[i] for i in idx]) if bags is not None else None
        with autocast(device, bf16):
            parts = model.classify_parts(tokens.to(device), lengths, bag)
        recurrent[torch.from_numpy(idx)] = parts[0].float().cpu()
        if bag_logits is not None:
            bag_logits[torch.from_numpy(idx)] = parts[1].float().cpu()  # type: ignore[union-attr]
    model.train(was_training)
    return recurrent, bag_logits


def predict_logits(model: RNNModel, seqs: Sequence[np.ndarray], device: torch.device, batch_size: int = 64,
                   bf16: bool = False, bags: Sequence[NgramBag] | None = None) -> torch.Tensor:
    """Class scores (N, C) for encoded inputs (and their bags): the model's ``classify``, batched."""
    parts = predict_parts(model, seqs, device, batch_size, bf16, bags)
    return model.classifier.mix(*parts)  # type: ignore[union-attr]


@torch.no_grad()
def sequence_nats(model: RNNModel, seqs: Sequence[np.ndarray], device: torch.device, batch_size: int = 64,
                  bf16: bool = False) -> torch.Tensor:
    """For each sequence (N,): the language model's nats of all its tokens after the first, read in turn."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = torch.empty(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        x, y = _lm_targets(*pad([seqs[i] for i in idx]))
        with autocast(device, bf16):
            logits, _ = model(x.to(device))
        nats = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        out[torch.from_numpy(idx)] = nats.sum(1).cpu()
    model.train(was_training)
    return out


def lm_loss(model: RNNModel, seqs: Sequence[np.ndarray], char_lengths: np.ndarray, device: torch.device,
            bf16: bool = False) -> dict[str, float]:
    """Language-model loss of label-prefixed sequences: nats/token and nats/char of the text."""
    nats = float(sequence_nats(model, seqs, device, bf16=bf16).sum())
    tokens_seen = sum(len(s) - 1 for s in seqs)
    chars = sum(int(char_lengths[s[1:]].sum()) for s in seqs)
    return {"lm_loss": nats / max(1, tokens_seen), "lm_nats_per_char": nats / max(1, chars),
            "lm_bits_per_char": nats / max(1, chars) / LN2}


def label_log_likelihoods(model: RNNModel, tokenizer: Tokenizer, seqs: Sequence[np.ndarray], device: torch.device,
                          bf16: bool = False) -> torch.Tensor:
    """log p(text | label) (N, C) from the language-model head: each classifier input (start token, text)
    read after each class's label token instead of the start, up to the newline that ends a text."""
    classes = model.classifier.classes  # type: ignore[union-attr]
    end = start_ids(tokenizer)
    out = [torch.empty(0, len(classes))]
    for start in range(0, len(seqs), 1024):  # a chunk of texts at a time: C sequences for each
        chunk = seqs[start: start + 1024]
        lm_seqs = [np.concatenate([[model.config.label_id(c)], seq[len(end):], end]) for seq in chunk for c in classes]
        out.append(-sequence_nats(model, lm_seqs, device, bf16=bf16).view(len(chunk), len(classes)))
    return torch.cat(out)


def can_vote(model: RNNModel) -> bool:
    """Whether the language model can vote in classification: it reads each class's label token."""
    classes = model.classifier.classes if model.classifier is not None else []
    return (not model.config.bidirectional and bool(classes)
            and all(c in model.config.label_tokens for c in classes))


def class_log_scores(model: RNNModel, tokenizer: Tokenizer, read: ClassifierInputs, device: torch.device,
                     vote: float = 0.0, log_prior: Sequence[float] | None = None, bf16: bool = False) -> torch.Tensor:
    """Class scores (N, C): the head's log-probabilities, plus ``vote`` times the language model's
    log p(text | label) + log p(label) (Bayes' rule over the label-conditioned LM) where vote > 0."""
    seqs = read.seqs
    scores = torch.log_softmax(predict_logits(model, seqs, device, bf16=bf16, bags=read.bags), dim=-1)
    if vote > 0:
        prior = torch.tensor(log_prior, dtype=torch.float32)
        scores += vote * (label_log_likelihoods(model, tokenizer, seqs, device, bf16) + prior)
    return scores


def _lm_targets(tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of padded sequences; padding targets are -100 (ignored)."""
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[torch.arange(y.size(1))[None, :] >= (lengths - 1)[:, None]] = -100
    return x, y


SHARE_GRID = tuple(i / 8 for i in range(9))  # the bag of n-grams' shares of the head tried on validation


def best_bag_share(head: ClassifierHead, recurrent: torch.Tensor, bag: torch.Tensor, targets: torch.Tensor) -> float:
    """The bag's share of the head's scores (SHARE_GRID: from 0, the recurrent part alone, to 1, the bag alone)
    with the lowest loss on these texts. The loss, not the accuracy: on a small validation set a share's
    accuracy moves with a text or two, and most shares tie; the loss also weighs how sure each part was."""
    return min(SHARE_GRID, key=lambda share: float(F.cross_entropy(head.mix(recurrent, bag, share), targets)))


# -- the model's parameter groups -------------------------------------------------------------------------

def layer_groups(model: RNNModel) -> list[list[torch.nn.Parameter]]:
    """Parameters from the bottom up: embedding, each recurrent layer, then the heads."""
    layers = model.config.layers
    groups: list[list[torch.nn.Parameter]] = [[] for _ in range(layers + 2)]
    for name, param in model.named_parameters():
        if name.startswith("encoder.embedding"):
            groups[0].append(param)
        elif name.startswith("encoder.rnn."):
            layer = int(name.rsplit("_l", 1)[1].split("_")[0])
            groups[1 + layer].append(param)
        else:
            groups[-1].append(param)
    return groups


def scaled_groups(model: RNNModel, lr_decay: float, fine_tune: bool) -> list[tuple[list[torch.nn.Parameter], float]]:
    """Layer groups from the top down, each with its learning-rate scale: lower layers slower when fine-tuning."""
    return [(params, lr_decay ** -depth if fine_tune else 1.0) for depth, params in enumerate(reversed(layer_groups(model)))]


# -- the bag of n-grams: a logistic regression, fitted once -------------------------------------------------

# Inverse L2 strengths tried (as scikit-learn's C: the loss is C * the summed cross-entropy + |W|^2 / 2).
BAG_C_GRID = (1.0, 10.0, 100.0)
BAG_ITERATIONS = 100  # L-BFGS iterations per fit: converged on every data set measured (seconds)


def fit_bag_weights(head: ClassifierHead, bags: Bag, targets: torch.Tensor, c: float) -> None:
    """Fit the bag's weights as a logistic regression of strength ``c`` on these texts (L-BFGS to convergence)."""
    weight = head.bag.weight
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=BAG_ITERATIONS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head.bag_logits(bags), targets, reduction="sum") * c
        loss = (loss + 0.5 * weight.pow(2).sum()) / len(targets)  # scaled: the same optimum, tamer steps
        loss.backward()
        return loss

    optimizer.step(objective)
    weight.requires_grad_(False)


def fit_bag(head: ClassifierHead, train: Encoded, val: Encoded) -> tuple[float, torch.Tensor]:
    """Fit the bag of n-grams as a logistic regression (as the linear baselines are fitted; minibatch Adam over
    the same epochs measured 0.02-0.04 lower) on the training texts for each strength in BAG_C_GRID, and keep
    the one with the lowest validation loss; then fit it again with that strength on the training and
    validation texts together, which the model keeps (on the man pages, 80% -> 100% of the labelled pages
    moved the bag's test accuracy 0.848 -> 0.862). The bag is then fixed: the recurrent part trains beside it.

    Returns C and the validation texts' bag logits from the fit that did not see them: evaluation mixes
    those with the recurrent part's (best_bag_share), so the share and the validation scores stay honest."""
    x_train, x_val = pad_bags(train.bags or []), pad_bags(val.bags or [])
    y_train, y_val = torch.from_numpy(train.targets), torch.from_numpy(val.targets)
    best: tuple[float, float, torch.Tensor] | None = None
    for c in BAG_C_GRID:
        fit_bag_weights(head, x_train, y_train, c)
        with torch.no_grad():
            val_logits = head.bag_logits(x_val)
        val_loss = float(F.cross_entropy(val_logits, y_val))
        if best is None or val_loss < best[0]:
            best = (val_loss, c, val_logits)
    assert best is not None
    _, c, held_out = best
    fit_bag_weights(head, pad_bags([*(train.bags or []), *(val.bags or [])]), torch.cat([y_train, y_val]), c)
    return c, held_out


# -- the trainer ------------------------------------------------------------------------------------------

class ClassifierTrainer(TrainLoop):
    """Trains the classifier head (and the encoder, and the LM head with --lm-weight) into ``run_dir``."""

    CONFIG_KEY = "classify_config"

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, train: Encoded, val: Encoded,
                 config: ClassifyConfig, run_dir: Path, meta: dict[str, Any], device: torch.device,
                 fine_tune: bool, callback: Callable[[TrainEvent], None] | None = None,
                 stop: threading.Event | None = None, resumed: bool = False,
                 val_bag_logits: torch.Tensor | None = None) -> None:
        super().__init__(model, tokenizer, config, run_dir, meta, device, callback, stop,
                         scaled=scaled_groups(model, config.lr_decay, fine_tune))
        self.config: ClassifyConfig = config
        self.train, self.val, self.fine_tune, self.resumed = train, val, fine_tune, resumed
        # The bag's validation logits from its fit without the validation texts (see fit_bag); None: the
        # model's own bag's (a run from before the bag was refitted on them).
        self.val_bag_logits = val_bag_logits
        self.groups = layer_groups(self.model)
        self.lengths = [len(s) for s in train.inputs]
        self._epoch_cache: tuple[int, list[np.ndarray], np.ndarray] = (-1, [], np.zeros(0, bool))
        self.unlabelled_start = np.asarray(start_ids(tokenizer), dtype=np.int64)
        self.steps_per_epoch = len(self._batches(0))
        self.max_steps = config.max_steps or config.max_epochs * self.steps_per_epoch
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.unfreeze_every = config.unfreeze_every or self.steps_per_epoch
        self.use_lm = config.lm_weight > 0 and bool(train.lm_inputs)
        classes = self.classes
        counts = np.bincount(train.targets, minlength=len(classes)).astype(float)
        weights = len(train) / (len(classes) * np.maximum(counts, 1)) if config.balance else np.ones(len(classes))
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.log_prior = np.log(np.maximum(counts, 1) / counts.sum()).tolist()
        self.votes = (() if config.lm_vote == 0 or not (self.use_lm and can_vote(model))
                      else VOTE_GRID if config.lm_vote is None else (config.lm_vote,))
        self.char_lengths = tokenizer.char_lengths()
        if len(self.char_lengths) < model.config.vocab_size:  # label tokens stand for no characters
            missing = model.config.vocab_size - len(self.char_lengths)
            self.char_lengths = np.concatenate([self.char_lengths, np.zeros(missing, self.char_lengths.dtype)])

    @property
    def classes(self) -> list[str]:
        return self.model.classifier.classes  # type: ignore[union-attr]

    def headline(self) -> str:
        t = self.meta.get("training", {})
        base = t.get("base")
        return (f"{self.said_choice(self.resumed)}{'resuming at step ' + str(self.pos.step) if self.resumed else 'training'}"
                f" a classifier on "
                f"{t.get('data')}: {len(self.classes)} classes, {len(self.train):,} training / {len(self.val):,} "
                f"validation texts ({t.get('duplicates_removed', 0):,} duplicates removed), "
                f"{'fine-tuning ' + str(base) if base else 'from scratch'}, {self.model.num_parameters():,} "
                f"parameters, device {self.device.type}, into {self.run_dir}")

    def _set_trainable(self) -> None:
        """Gradual unfreezing: the heads first, then one more layer group downwards every few steps."""
        if not self.fine_tune:
            return
        unfrozen = 1 + self.pos.step // self.unfreeze_every
        for depth, params in enumerate(reversed(self.groups)):
            for p in params:
                p.requires_grad_(depth < unfrozen)

    def _epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The batches of ``epoch``, and which LM texts it reads without their label (a mask over the
        training texts); both fixed by (seed, epoch) and computed once per epoch, not per step."""
        if self._epoch_cache[0] != epoch:
            batches = length_batches(self.lengths, self.config.batch_size, self.config.seed, epoch)
            rng = np.random.default_rng([self.config.seed, epoch, 1])
            unlabelled = rng.random(len(self.lengths)) < self.config.label_dropout
            self._epoch_cache = (epoch, batches, unlabelled & bool(len(self.unlabelled_start)))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _batches(self, epoch: int) -> list[np.ndarray]:
        return self._epoch_plan(epoch)[0]

    def _lm_inputs(self, idx: np.ndarray, epoch: int) -> list[np.ndarray]:
        """The LM texts of a batch: the label token first, or for the epoch's unlabelled share a newline."""
        unlabelled = self._epoch_plan(epoch)[1]
        return [np.concatenate([self.unlabelled_start, self.train.lm_inputs[i][1:]]) if unlabelled[i]
                else self.train.lm_inputs[i] for i in idx]

    def compute_loss(self) -> torch.Tensor:
        pos, config = self.pos, self.config
        if pos.index >= len(self._batches(pos.epoch)):
            pos.epoch, pos.index = pos.epoch + 1, 0
        idx = self._batches(pos.epoch)[pos.index]
        self._set_trainable()
        tokens, lengths = pad([self.train.inputs[i] for i in idx])
        if config.token_dropout > 0:
            tokens = drop_tokens(tokens, config.token_dropout, len(self.unlabelled_start), self.tokenizer.unk_id)
        targets = torch.from_numpy(self.train.targets[idx]).to(self.device)
        with autocast(self.device, self.bf16):
            # The recurrent part alone (no bags): the bag was fitted before (fit_bag); evaluate() mixes the two.
            logits, _ = self.model.classify_parts(tokens.to(self.device), lengths)
        loss = F.cross_entropy(logits.float(), targets, weight=self.class_weights,
                               label_smoothing=config.label_smoothing)
        if self.use_lm:
            x, y = _lm_targets(*pad(self._lm_inputs(idx, pos.epoch)))
            with autocast(self.device, self.bf16):
                lm_logits, _ = self.model(x.to(self.device))
            loss = loss + config.lm_weight * F.cross_entropy(lm_logits.float().flatten(0, 1),
                                                             y.to(self.device).flatten(), ignore_index=-100)
        return loss

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics; with the LM's vote, of the weight that classifies the most texts right (the
        smallest of equals), kept as ``lm_vote``; ``loss`` is the head's."""
        held_out = self.val_bag_logits  # the bag's logits from its fit without these texts (see fit_bag)
        recurrent, bag = predict_parts(self.model, self.val.inputs, self.device, bf16=self.bf16,
                                       bags=self.val.bags if held_out is None else None)
        if held_out is not None:
            bag = held_out
        share = self._choose_bag_share(recurrent, bag) if bag is not None else None
        head = torch.log_softmax(self.model.classifier.mix(recurrent, bag), dim=-1)  # type: ignore[union-attr]
        scores, vote = head, 0.0
        if self.votes:
            lm = label_log_likelihoods(self.model, self.tokenizer, self.val.inputs, self.device, self.bf16)
            lm += torch.tensor(self.log_prior)
            correct = [int(((head + w * lm).argmax(1).numpy() == self.val.targets).sum()) for w in self.votes]
            vote = self.votes[int(np.argmax(correct))]  # the first of the best: the smallest weight
            scores = head + vote * lm
        classes = self.model.classifier.classes  # type: ignore[union-attr]
        val = classification_metrics(self.val.targets, scores.argmax(1).numpy(), classes)
        val["loss"] = float(F.nll_loss(head, torch.from_numpy(self.val.targets)))
        val["lm_vote"] = vote
        if share is not None:
            val["bag_share"] = share
        if self.val.lm_inputs and not self.model.config.bidirectional:
            val.update(lm_loss(self.model, self.val.lm_inputs, self.char_lengths, self.device, bf16=self.bf16))
        return val

    def _choose_bag_share(self, recurrent: torch.Tensor, bag: torch.Tensor) -> float:
        """The bag's share (best_bag_share on the validation texts), set in the model."""
        head = self.model.classifier
        share = best_bag_share(head, recurrent, bag, torch.from_numpy(self.val.targets))  # type: ignore[arg-type]
        head.bag_share.fill_(share)  # type: ignore[union-attr]
        return share

    def take_if_best(self, val: dict[str, Any]) -> bool:
        # Higher accuracy wins; at equal accuracy (often 1.0 on easy data) a lower loss, the LM's included,
        # so the language model keeps improving the checkpoint that is kept.
        total = val["loss"] + self.config.lm_weight * val.get("lm_loss", 0.0)
        if (val["accuracy"], -total) <= (self.pos.best_accuracy, -self.pos.best_loss):
            return False
        self.pos.best_accuracy, self.pos.best_loss = val["accuracy"], total
        return True

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        held_out = {} if self.val_bag_logits is None else {"val_bag_logits": self.val_bag_logits}
        return {"fine_tune": self.fine_tune}, held_out

    def restore_extra(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.val_bag_logits = tensors.get("val_bag_logits")

    def extra_meta(self) -> dict[str, Any]:
        return {"classify": {"max_len": self.config.max_len, "config": to_dict(self.config),
                             "lm_vote": self.last_val.get("lm_vote", 0.0), "log_prior": self.log_prior}}


# -- assembling a run ---------------------------------------------------------------------------------------

def prepare_classifier(data_paths: Sequence[str], out: str | Path, base: str | None = None,
                       resume: bool = False, callback: Callable[[TrainEvent], None] | None = None,
                       stop: threading.Event | None = None, **options: Any) -> ClassifierTrainer:
    """A ClassifierTrainer for a new run (from scratch, or fine-tuning ``base``), or resuming ``out``.

    ``options``: the fields of ModelConfig (``hidden``, ``bidirectional``, ...), TokenizerConfig, ReadConfig
    (how the data is read: ``text_columns``, ``label_column``, ...) and ClassifyConfig."""
    run_dir = Path(out)
    # TokenizerConfig first: its vocab_size is the one a user sets (the model's follows from the tokenizer).
    tokenizer_options, model_options, read_options, run_options = split_options(
        options, TokenizerConfig, ModelConfig, ReadConfig, ClassifyConfig, what="classifier option")
    if resume:
        return _prepare_resume(run_dir, data_paths, run_options, callback, stop)
    refuse_existing_run(run_dir)
    config = ClassifyConfig(**run_options)
    data = read_labelled(list(data_paths), **to_dict(ReadConfig(**read_options)))
    train_set, val_set = stratified_split(data, config.val_fraction, config.seed)
    classes = data.classes
    device = resolve_device(config.device)
    choice = Choice()
    if config.preset == "auto":
        stats = LabelledStats.of(train_set.texts)  # only what the choice reads: plain runs skip the pass
        choose_classifier(stats, config, {**tokenizer_options, **model_options, **run_options}, choice,
                          new_model=not base)
        tokenizer_options = {**pick(choice.options, TokenizerConfig), **tokenizer_options}
        config = replace(config, **pick(choice.options, ClassifyConfig))
    torch.manual_seed(config.seed)
    if base:
        if model_options.get("bidirectional"):
            raise InputError(f"--bidirectional shapes a new model, but --from fine-tunes {base} as it is; "
                             "drop it, or train from scratch without --from")
        model, tokenizer, _ = load_base(base, model_options, tokenizer_options)
        model = model.adapted(replace(model.config, **model_options))  # only dropout rates may differ
        head = model.classifier
        if head is not None and (head.classes, head.ngrams, head.char_ngrams) != (
                classes, config.ngrams, char_ngrams_for(tokenizer, config.ngrams)):
            del model.heads["classifier"]  # a new task, or another kind of head: a new head
    else:
        tok = TokenizerConfig(**tokenizer_options)
        # A chosen vocabulary may be more than a small data set can fill: then the most it can.
        tokenizer = fit_tokenizer(["\n".join(train_set.texts) + "\n"], tok.tokenizer, tok.vocab_size,
                                  tok.min_char_count, shrink="vocab_size" in choice.options)
        model = RNNModel(ModelConfig(vocab_size=tokenizer.vocab_size, **model_options))
    if config.lm_weight > 0 and not model.config.bidirectional:
        model = model.with_label_tokens(classes)
    if model.classifier is None:
        model.heads["classifier"] = ClassifierHead(model.encoder.output_size, classes, config.head_dropout,
                                                   config.ngrams, char_ngrams_for(tokenizer, config.ngrams))
    head = model.classifier
    assert head is not None
    train_enc = encode_data(train_set, tokenizer, model.config, config.max_len, head)
    val_enc = encode_data(val_set, tokenizer, model.config, config.max_len, head)
    bag_c, val_bag_logits, fitting = None, None, 0.0
    if train_enc.bags is not None:
        started = time.perf_counter()
        head.set_idf([ids for ids, _ in train_enc.bags])
        bag_c, val_bag_logits = fit_bag(head, train_enc, val_enc)
        fitting = time.perf_counter() - started
    if config.preset == "auto":
        choice.line = describe_classifier({**to_dict(model.config), "tokenizer": tokenizer.kind}, stats, config,
                                          head.char_ngrams)
    meta = {"training": {"task": "classify", "data": ", ".join(str(p) for p in data_paths),
                         "corpus": ", ".join(str(p) for p in data_paths),
                         "examples": len(train_set), "val_examples": len(val_set), "classes": classes,
                         "duplicates_removed": train_set.duplicates_removed, "skipped": dict(data.skipped),
                         "unknown_characters": train_enc.unknown + val_enc.unknown,
                         "base": str(base) if base else None, "bag_c": bag_c,
                         **({"chosen": choice.to_dict()} if choice.line else {})},
            "resume": {"data": {"paths": [str(Path(p).resolve()) for p in data_paths], "read": read_options,
                                "examples": len(data)}}}
    trainer = ClassifierTrainer(model, tokenizer, train_enc, val_enc, config, run_dir, meta, device,
                                fine_tune=bool(base), callback=callback, stop=stop, val_bag_logits=val_bag_logits)
    trainer.pos.elapsed = fitting  # fitting the bag is training: --max-time counts it (a minute on long texts)
    return trainer


def train_classifier_from_options(data_paths: Sequence[str], out: str | Path, base: str | None = None,
                                  resume: bool = False, **options: Any) -> RunResult:
    """Python API entry point (``options``: see ``prepare_classifier``): trains to the end. Ctrl-C or SIGTERM
    stop it after saving (``stopped == "interrupted"``), as in the CLI."""
    return run_to_end(prepare_classifier(data_paths, out, base=base, resume=resume, **options))


def _prepare_resume(run_dir: Path, data_paths: Sequence[str], overrides: dict[str, Any],
                    callback: Callable[[TrainEvent], None] | None,
                    stop: threading.Event | None) -> ClassifierTrainer:
    last = resume_point(run_dir)
    state, tensors = load_trainer_state(last)
    if "classify_config" not in state:
        raise InputError(f"{run_dir} is a language-model run; resume it with `rnngen train --resume`")
    saved = state["data"]
    paths = list(data_paths) or saved["paths"]
    data = read_labelled(paths, **saved["read"])
    if len(data) != saved["examples"]:
        raise InputError("the labelled data differs from the data this run was trained on; resume with the "
                         "same files, or start a new run with another --out")
    config = replace(from_dict(ClassifyConfig, state["classify_config"]), **overrides)
    device = resolve_device(config.device)
    model, tokenizer, ckpt, _ = load_checkpoint(last, device)
    train_set, val_set = stratified_split(data, config.val_fraction, config.seed)
    head = model.classifier
    assert head is not None
    train_enc = encode_data(train_set, tokenizer, model.config, config.max_len, head)
    val_enc = encode_data(val_set, tokenizer, model.config, config.max_len, head)
    meta = {"training": {k: v for k, v in ckpt.get("training", {}).items()
                         if k not in ("step", "seconds", "best_step", "best_val", "last_val")},
            "resume": {"data": saved}}
    trainer = ClassifierTrainer(model, tokenizer, train_enc, val_enc, config, run_dir, meta, device,
                                fine_tune=state["fine_tune"], callback=callback, stop=stop, resumed=True)
    trainer.restore(state, tensors)
    trainer.best_val = dict(ckpt.get("training", {}).get("best_val") or {})
    return trainer


def max_len_of(checkpoint_config: dict[str, Any]) -> int:
    """The --max-len a classifier checkpoint was trained with."""
    return int(checkpoint_config.get("classify", {}).get("max_len", 256))


def checkpoint_scores(model: RNNModel, tokenizer: Tokenizer, checkpoint_config: dict[str, Any],
                      texts: Sequence[str], device: torch.device,
                      vote: float | None = None) -> tuple[torch.Tensor, int, float]:
    """Class scores (N, C) of ``texts``, the count of characters the tokenizer could not represent, and the
    weight of the LM's vote used: ``vote``, or by default the one the checkpoint chose in training."""
    if model.classifier is None:
        raise InputError("this checkpoint has no classification head; train one with "
                         "`rnngen classify train DATA --from CHECKPOINT`")
    read = encode_texts(tokenizer, texts, max_len_of(checkpoint_config), model.classifier.ngrams,
                        model.classifier.char_ngrams)
    saved = checkpoint_config.get("classify", {})
    if "log_prior" not in saved or not can_vote(model):
        vote = 0.0
    elif vote is None:
        vote = float(saved.get("lm_vote", 0.0))
    return class_log_scores(model, tokenizer, read, device, vote, saved.get("log_prior")), read.unknown, vote


def classify_texts(model: RNNModel, tokenizer: Tokenizer, checkpoint_config: dict[str, Any], texts: Sequence[str],
                   device: torch.device, top: int | None = None, vote: float | None = None) -> list[dict[str, Any]]:
    """For each text: its label, the probability of that label, and the ``top`` most likely classes."""
    probs = torch.softmax(checkpoint_scores(model, tokenizer, checkpoint_config, texts, device, vote)[0], dim=-1)
    classes = model.classifier.classes  # type: ignore[union-attr]
    k = min(top or len(classes), len(classes))
    values, indices = probs.topk(k, dim=-1)
    return [{"label": classes[int(idx[0])], "probability": float(val[0]),
             "top": [{"label": classes[int(i)], "probability": float(v)} for v, i in zip(val, idx)]}
            for val, idx in zip(values, indices)]


def evaluate_classifier(model: RNNModel, tokenizer: Tokenizer, checkpoint_config: dict[str, Any],
                        data: LabelledData, device: torch.device, vote: float | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of ``data``, and the weight of
    the LM's vote used (``vote``, by default the checkpoint's)."""
    scores, unknown, vote = checkpoint_scores(model, tokenizer, checkpoint_config, data.texts, device, vote)
    classes = model.classifier.classes  # type: ignore[union-attr]
    truth = np.asarray(data.label_ids(classes))
    predicted = scores.argmax(1).numpy()
    return {**classification_metrics(truth, predicted, classes), "unknown_characters": unknown, "lm_vote": vote}
