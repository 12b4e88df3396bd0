"""rnngen: train recurrent language models on your own text; generate, chat and classify with them.

Importing rnngen is cheap: torch is imported by the functions that need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .generate import Generator


def load(path: str, device: str = "cpu") -> Generator:
    """Load a checkpoint (a run directory or a checkpoint directory) for generation and evaluation."""
    from .generate import Generator

    return Generator.load(path, device=device)


def train(corpus: list[str] | None = None, out: str = "checkpoints/run", base: str | None = None,
          **options: Any) -> Any:
    """Train a language model on text files (the built-in corpus when ``corpus`` is empty), from scratch
    or fine-tuning the trained model in ``base`` (``rnngen train --from``).

    ``options`` are the fields of ModelConfig and TrainConfig (e.g. ``hidden=256, max_steps=500``) and
    ``tokenizer``, ``vocab_size``, ``min_char_count``, ``encoding``, ``errors``, ``resume``.
    Returns a TrainResult.
    """
    from .train import train_from_options

    return train_from_options(corpus or [], out, base=base, **options)


def train_classifier(data: list[str], out: str = "checkpoints/classifier", base: str | None = None,
                     **options: Any) -> Any:
    """Train a classifier on labelled data (CSV/TSV/JSONL files, or folders; see ``rnngen classify train``),
    from scratch or fine-tuning the language model in ``base``.

    ``options`` are the fields of ClassifyConfig (``max_epochs``, ``lm_weight``, ``lm_vote``, ...), of
    ModelConfig (``hidden``, ...), the tokenizer's (``tokenizer``, ``vocab_size``), the reader's
    (``text_columns``, ``label_column``, ``header``, ``fmt``, ``encoding``, ``skip_bad_rows``),
    ``bidirectional`` and ``resume``. Returns a ClassifyResult.
    """
    from .classify import train_classifier_from_options

    return train_classifier_from_options(data, out, base=base, **options)


__all__ = ["__version__", "load", "train", "train_classifier"]
