"""rnngen: train recurrent language models on your own text; generate, chat and classify with them.

Importing rnngen is cheap: torch is imported by the functions that need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .loaded import LoadedModel
    from .loop import RunResult


def load(path: str, device: str = "cpu") -> LoadedModel:
    """Load a checkpoint (a run directory or a checkpoint directory) to generate, classify, evaluate and chat."""
    from .loaded import LoadedModel

    return LoadedModel.load(path, device=device)


def train(corpus: list[str] | None = None, out: str = "checkpoints/run", base: str | None = None,
          **options: Any) -> RunResult:
    """Train a language model on text files (the built-in corpus when ``corpus`` is empty), from scratch
    or fine-tuning the trained model in ``base`` (``rnngen train --from``).

    ``options`` are the fields of ModelConfig, TokenizerConfig and TrainConfig (e.g. ``hidden=256,
    max_steps=500``, ``tokenizer="bpe"``) and ``encoding``, ``errors``, ``resume``. Ctrl-C stops the run
    after saving it, as in the CLI. Returns a RunResult.
    """
    from .training import train_from_options

    return train_from_options(corpus or [], out, base=base, **options)


def train_classifier(data: list[str], out: str = "checkpoints/classifier", base: str | None = None,
                     **options: Any) -> RunResult:
    """Train a classifier on labelled data (CSV/TSV/JSONL files, or folders; see ``rnngen classify train``),
    from scratch or fine-tuning the language model in ``base``.

    ``options`` are the fields of ClassifyConfig (``max_epochs``, ``lm_weight``, ``lm_vote``, ...), of
    ModelConfig (``hidden``, ``bidirectional``, ...), TokenizerConfig (``tokenizer``, ``vocab_size``), ReadConfig
    (``text_columns``, ``label_column``, ``header``, ``fmt``, ``encoding``, ``skip_bad_rows``) and ``resume``.
    Ctrl-C stops the run after saving it. Returns a RunResult.
    """
    from .classify import train_classifier_from_options

    return train_classifier_from_options(data, out, base=base, **options)


__all__ = ["__version__", "load", "train", "train_classifier"]
