"""`rnngen train CORPUS --from CKPT`: fine-tuning a trained language model on another corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen.checkpoint import load_checkpoint, save_checkpoint
from rnngen.config import ModelConfig
from rnngen.model import ClassifierHead, RNNModel
from rnngen.tokenizers import CharTokenizer
from rnngen.training import train_from_options

from conftest import TINY, pattern_text, run_cli

LEARN = dict(hidden=64, emb_dim=16, layers=1, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=10,
             dropout=0.0, emb_dropout=0.0)


@pytest.fixture(scope="module")
def pattern_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that has learnt a^n b^n for n = 1..6 (see test_train)."""
    root = tmp_path_factory.mktemp("base")
    corpus = root / "pattern.txt"
    corpus.write_text(pattern_text(), encoding="utf-8")
    result = train_from_options([str(corpus)], root / "run", max_steps=300, eval_every=100, **LEARN)
    assert result.best_val["loss"] < 0.05, result.best_val
    return root / "run"


def test_fine_tuning_keeps_what_the_base_learnt_and_learns_new_characters(tmp_path: Path,
                                                                          pattern_base: Path) -> None:
    """The new corpus is the same language with its lines ending in a character the base never saw.
    Thirty steps from the base reach what thirty steps from scratch cannot (counting), and the new
    character, added to the vocabulary, is written where it belongs."""
    corpus = tmp_path / "accented.txt"
    corpus.write_text(pattern_text().replace("\n", " é\n"), encoding="utf-8")
    steps = dict(max_steps=30, eval_every=30, **LEARN)
    tuned = train_from_options([str(corpus)], tmp_path / "tuned", base=str(pattern_base), **steps)
    scratch = train_from_options([str(corpus)], tmp_path / "scratch", **steps)
    assert tuned.best_val["loss"] < 0.25 < scratch.best_val["loss"], (tuned.best_val, scratch.best_val)
    gen = rnngen.load(str(tmp_path / "tuned"))
    assert gen.tokenizer.decode(range(gen.tokenizer.vocab_size)).endswith("é")
    assert gen.sample("aaaaabbbbb ", length=30, greedy=True).startswith("aaaaaabbbbbb é\nab aabb aaabbb")
    training = json.loads((tmp_path / "tuned" / "best" / "config.json").read_text())["training"]
    assert training["base"] == str(pattern_base / "best") and training["added_characters"] == "é"
    assert training["unknown_tokens"] == 0


def test_adapted_model_keeps_every_kept_row_and_drops_labels() -> None:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=5, hidden=8, emb_dim=4, layers=2)).with_label_tokens(["x", "y"])
    model.heads["classifier"] = ClassifierHead(8, ["x", "y"])
    grown = model.adapted(ModelConfig(vocab_size=8, hidden=8, emb_dim=4, layers=2, dropout=0.3,
                                      label_tokens=("y",)))
    old, new = model.state_dict(), grown.state_dict()
    for key in ("encoder.embedding.weight", "lm_head.proj.weight", "lm_head.bias"):
        assert torch.equal(new[key][:5], old[key][:5])  # the text symbols
        assert torch.equal(new[key][7], old[key][6])  # label y moved behind the two new symbols
    assert all(torch.equal(new[k], v) for k, v in old.items() if k.startswith(("encoder.rnn", "heads")))
    assert grown.lm_head.dropout.p == 0.3 and grown.config.label_tokens == ("y",)


def test_cli_fine_tunes_and_the_run_resumes_without_its_base(tmp_path: Path, tiny_run: Path) -> None:
    corpus = tmp_path / "poem.txt"
    corpus.write_text("Über die Brücke — ça va? 🙂\n" * 400 + "ʬ\n", encoding="utf-8")  # ʬ: once
    base = tmp_path / "base"
    shutil.copytree(tiny_run, base)
    proc = run_cli("train", str(corpus), "--from", str(base), "--out", str(tmp_path / "ft"), "--max-steps", "10",
                   "--eval-every", "10", "--dropout", "0.25", "--batch-size", "8", "--seq-len", "32",
                   "--sample-length", "0", "--min-char-count", "2")
    assert proc.returncode == 0, proc.stderr
    assert "new to" in proc.stderr and "added to its vocabulary" in proc.stderr
    assert "1 character(s) of the corpus, rarer than --min-char-count, are read as <unk>" in proc.stderr
    config = json.loads((tmp_path / "ft" / "last" / "config.json").read_text())
    base_config = json.loads((base / "best" / "config.json").read_text())
    assert config["model"]["dropout"] == 0.25 and config["model"]["hidden"] == base_config["model"]["hidden"]
    _, base_tokenizer, _, _ = load_checkpoint(base)
    new = {c for c in corpus.read_text(encoding="utf-8") if base_tokenizer.count_unknown(c)} - {"ʬ"}
    assert {"Ü", "ü", "ç", "🙂"} <= new and set(config["training"]["added_characters"]) == new
    shutil.rmtree(base)  # the run holds everything it needs
    proc = run_cli("train", "--resume", "--out", str(tmp_path / "ft"), "--max-steps", "20", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 20
    assert "fine-tuned from" in run_cli("info", str(tmp_path / "ft")).stdout
    _, tokenizer, _, _ = load_checkpoint(tmp_path / "ft")
    assert tokenizer.count_unknown(corpus.read_text(encoding="utf-8")) == 1


def test_a_subword_base_spells_unseen_characters_in_bytes(tmp_path: Path, prose_corpus: Path) -> None:
    proc = run_cli("train", str(prose_corpus), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe",
                   "--vocab-size", "500", "--max-steps", "5", "--eval-every", "5", *TINY, "--quiet")
    assert proc.returncode == 0, proc.stderr
    corpus = tmp_path / "greek.txt"
    corpus.write_text("αβγ the end\n" * 500, encoding="utf-8")
    proc = run_cli("train", str(corpus), "--from", str(tmp_path / "bpe"), "--out", str(tmp_path / "ft"),
                   "--max-steps", "100", "--eval-every", "100", "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    training = json.loads((tmp_path / "ft" / "best" / "config.json").read_text())["training"]
    assert training["unknown_tokens"] == 0 and training["added_characters"] == ""
    before, after = (json.loads(run_cli("eval", str(tmp_path / run), str(corpus), "--json").stdout)
                     for run in ("bpe", "ft"))
    assert after["nats_per_char"] < 0.5 * before["nats_per_char"], (before, after)


def test_a_classifier_base_becomes_a_plain_language_model(tmp_path: Path, pattern_base: Path) -> None:
    model, tokenizer, config, _ = load_checkpoint(pattern_base)
    model = model.with_label_tokens(["odd", "even"])
    model.heads["classifier"] = ClassifierHead(model.encoder.output_size, ["odd", "even"])
    save_checkpoint(tmp_path / "classifier", model, tokenizer, {})
    corpus = tmp_path / "pattern.txt"
    corpus.write_text(pattern_text(), encoding="utf-8")
    train_from_options([str(corpus)], tmp_path / "lm", base=str(tmp_path / "classifier"), max_steps=5, **LEARN)
    tuned, _, _, _ = load_checkpoint(tmp_path / "lm")
    assert tuned.classifier is None and tuned.config.label_tokens == ()
    assert tuned.config.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("args, message", [
    (["--hidden", "64", "--layers", "1"], "--hidden 64 would change the network or vocabulary of"),
    (["--tokenizer", "bpe"], "--tokenizer bpe would change"),
    (["--resume"], "--from starts a new run and --resume continues one"),
])
def test_impossible_fine_tunes_are_refused(tmp_path: Path, tiny_run: Path, pattern_corpus: Path, args: list[str],
                                           message: str) -> None:
    proc = run_cli("train", str(pattern_corpus), "--from", str(tiny_run), "--out", str(tmp_path / "ft"), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_bidirectional_base_is_refused(tmp_path: Path, pattern_corpus: Path) -> None:
    model = RNNModel(ModelConfig(vocab_size=4, hidden=8, emb_dim=4, layers=1, bidirectional=True))
    save_checkpoint(tmp_path / "bi", model, CharTokenizer(["a", "b", " "]), {})
    proc = run_cli("train", str(pattern_corpus), "--from", str(tmp_path / "bi"), "--out", str(tmp_path / "ft"))
    assert proc.returncode == 2 and "bidirectional encoder" in proc.stderr and "Traceback" not in proc.stderr
