"""The loaded model: what ``rnngen.load`` returns and every command that reads a checkpoint works with.

A ``LoadedModel`` is a ``Sampler`` (generate.py) that also knows its checkpoint: it classifies, evaluates a
text, holds conversations and describes itself (``summary``, what `rnngen info` shows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chat import DEFAULT_STOP, ChatSession
from .checkpoint import load_checkpoint, read_metrics, run_dir_of
from .classify import classify_texts, evaluate_classifier
from .config import SampleConfig
from .errors import InputError
from .generate import Sampler
from .inspect import Inspection, inspect_text
from .labelled import LabelledData
from .model import RNNModel
from .runtime import evaluate
from .tokenizers import Tokenizer


class LoadedModel(Sampler):
    """A checkpoint's model and tokenizer on a device, with its ``config`` (config.json) and ``directory``."""

    def __init__(self, model: RNNModel, tokenizer: Tokenizer, config: dict[str, Any], directory: Path,
                 fast: bool = True) -> None:
        super().__init__(model, tokenizer, fast)
        self.config, self.directory = config, directory

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu", fast: bool = True) -> LoadedModel:
        """A run directory (its best/, else last/) or a checkpoint directory, loaded on ``device``."""
        model, tokenizer, config, directory = load_checkpoint(path, device)
        return cls(model, tokenizer, config, directory, fast)

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.directory)

    @property
    def classes(self) -> list[str]:
        """Classes of the classification head; empty when the model has none."""
        head = self.model.classifier
        return list(head.classes) if head is not None else []

    def chat(self, user_prefix: str = "", bot_prefix: str = "", context: str = "", temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, length: int = 300,
             stop: Sequence[str] | None = None, seed: int | None = None) -> ChatSession:
        """A conversation whose recurrent state is carried from turn to turn (see ``rnngen.chat``): its
        ``say(line)`` returns the reply; ``context`` is read before the first turn; ``stop`` ends a reply
        (by default a blank line, as in `rnngen chat`)."""
        config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length,
                              stop=DEFAULT_STOP if stop is None else tuple(stop), seed=seed)
        return ChatSession(self, config, user_prefix, bot_prefix, context)

    def classify(self, texts: Sequence[str] | str, top: int | None = None,
                 lm_vote: float | None = None) -> list[dict[str, Any]]:
        """Label and class probabilities (most likely first, ``top`` of them) for each text; ``lm_vote``
        overrides the weight of the language model's vote that the checkpoint chose (0: the head alone)."""
        return classify_texts(self.model, self.tokenizer, self.config, [texts] if isinstance(texts, str) else texts,
                              self.device, top, lm_vote)

    def evaluate_labelled(self, data: LabelledData, lm_vote: float | None = None) -> dict[str, Any]:
        """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of labelled ``data``."""
        return evaluate_classifier(self.model, self.tokenizer, self.config, data, self.device, lm_vote)

    def evaluate(self, text: str) -> dict[str, float]:
        """Loss of ``text`` under the model: nats/token, nats/char, bits/char, perplexity."""
        tokens = self.tokenizer.encode(text)
        if len(tokens) < 2:
            raise InputError("the text is too short to evaluate; give it at least two characters")
        result = evaluate(self.model, tokens, self.tokenizer.char_lengths(), self.device)
        return {**result, "unknown_characters": self.unknown_characters(text)}

    def inspect(self, text: str, features: dict[str, str] | None = None, **options: Any) -> Inspection:
        """What the model makes of ``text`` (`rnngen inspect`): each character's surprisal, the cells that follow
        simple features of the text (and ``features``: name -> regex), and how its gates saturate."""
        return inspect_text(self.model, self.tokenizer, text, features=features, **options)

    def summary(self) -> dict[str, Any]:
        """What the checkpoint is: model, tokenizer, what it was trained on and how well, its history
        (metrics.jsonl) and the last sample written while training. What `rnngen info` shows."""
        m, t = self.model.config, self.config.get("training", {})
        tok, classes = self.tokenizer, self.classes
        metrics = read_metrics(self.run_dir)
        sampled = [r for r in metrics if r.get("sample") is not None]
        return {
            "directory": str(self.directory),
            "model": {"arch": m.arch, "layers": m.layers, "hidden": m.hidden, "emb_dim": m.emb_dim,
                      "dropout": m.dropout, "tie_weights": m.tie_weights, "bidirectional": m.bidirectional},
            "parameters": self.model.num_parameters(),
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
            "vocabulary": "".join(tok.decode([i]) for i in range(1, tok.vocab_size)) if tok.kind == "char" else None,
            "classes": classes, "labels": self.labels,
            "corpus": t.get("corpus") or t.get("data"), "base": t.get("base"),
            "chosen": t.get("chosen"),
            "steps": t.get("step"), "seconds": t.get("seconds"), "best_step": t.get("best_step"),
            "best": t.get("best_val") or {},
            "lm_vote": self.config.get("classify", {}).get("lm_vote", 0.0) if classes else None,
            "written_by": self.config.get("rnngen_version"),
            "history": metrics,
            "last_sample": {"step": sampled[-1]["step"], "text": sampled[-1]["sample"]} if sampled else None,
        }
