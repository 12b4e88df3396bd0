"""Classification on the shared encoder: masking, learning an order-dependent task, fine-tuning a language
model, label-conditioned generation, both heads in one checkpoint, resume, and the CLI."""

from __future__ import annotations

import csv
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import rnngen
from rnngen.checkpoint import load_checkpoint
from rnngen.classify import (VOTE_GRID, classification_metrics, drop_tokens, encode_texts, label_log_likelihoods,
                             length_batches, pad, pad_bags, predict_logits, prepare_classifier)
from rnngen.model import bag_of_ngrams
from rnngen.config import ModelConfig
from rnngen.errors import InputError
from rnngen.loop import WeightAverage
from rnngen.model import ClassifierHead, RNNModel
from rnngen.tokenizers import CharTokenizer

from conftest import run_cli

FILL = ["the", "food", "was", "very", "a", "day", "it", "so", "and"]
SMALL = ["--hidden", "32", "--emb-dim", "16", "--layers", "1", "--device", "cpu"]


def order_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs of texts with the same characters: "not" before "good" is negative, after it positive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n // 2):
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 5))]
        a, b = sorted(rng.sample(range(len(words) + 2), 2))
        for first, second, label in (("not", "good", "negative"), ("good", "not", "positive")):
            text = list(words)
            text.insert(a, first)
            text.insert(b, second)
            rows.append((" ".join(text), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture
def order_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "order.csv", order_rows(1600))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_padding_never_changes_a_prediction(arch: str, bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=20, arch=arch, hidden=16, emb_dim=8, layers=2,
                                 bidirectional=bidirectional)).eval()
    model.heads["classifier"] = ClassifierHead(model.encoder.output_size, ["a", "b", "c"], 0.0)
    seqs = [np.array([3, 4, 5]), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), np.array([7])]
    with torch.no_grad():
        alone = [model.classify(*pad([s])) for s in seqs]
        batched = model.classify(*pad(seqs))
        padded_more = model.classify(torch.cat([pad(seqs)[0], torch.full((3, 5), 13)], 1), pad(seqs)[1])
    for i, logits in enumerate(alone):
        torch.testing.assert_close(batched[i], logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded_more[i], logits[0], atol=1e-5, rtol=1e-5)


def test_metrics_by_hand() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["y"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_batches_cover_every_example_once_and_are_fixed_by_seed_and_epoch() -> None:
    lengths = [random.Random(1).randint(1, 50) for _ in range(1000)]
    batches = length_batches(lengths, 32, seed=3, epoch=2)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(np.array_equal(a, b) for a, b in zip(batches, length_batches(lengths, 32, seed=3, epoch=2)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, length_batches(lengths, 32, seed=3, epoch=3)))


def test_token_dropout_replaces_a_share_of_tokens_but_never_the_start() -> None:
    tokens = torch.randint(1, 50, (64, 40))
    torch.manual_seed(0)
    dropped = drop_tokens(tokens, 0.25, keep=1, unk_id=0)
    changed = dropped != tokens
    assert not changed[:, 0].any() and (dropped[changed] == 0).all()
    assert 0.22 < changed[:, 1:].float().mean() < 0.28
    assert torch.equal(drop_tokens(tokens, 0.0, keep=1, unk_id=0), tokens)


def test_learns_an_order_dependent_task_a_bag_of_characters_cannot(order_csv: Path, tmp_path: Path) -> None:
    rows = order_rows(1600)
    # Each negative text has a positive twin made of exactly the same characters, so any model of
    # character counts gives both the same answer: at most 50% accuracy.
    for (neg, _), (pos, _) in zip(rows[0::2], rows[1::2]):
        assert sorted(neg) == sorted(pos) and neg != pos
    # Through the Python API, which sorts the options out for the model, the reader and the trainer.
    result = rnngen.train_classifier([str(order_csv)], str(tmp_path / "run"), hidden=32, emb_dim=16, layers=1,
                                     max_epochs=6, lr=5e-3, device="cpu", lm_weight=0.0, text_columns=["text"])
    assert result.best_val["accuracy"] >= 0.95
    assert load_checkpoint(tmp_path / "run")[0].config.hidden == 32
    with pytest.raises(InputError, match="unknown classifier option.*max_epoch"):
        rnngen.train_classifier([str(order_csv)], str(tmp_path / "other"), max_epoch=6)
    texts = ["good it was not so", "it was not good"]
    labels = [r["label"] for r in rnngen.load(str(tmp_path / "run")).classify(texts)]
    assert labels == ["positive", "negative"]


def test_cli_train_predict_eval_and_label_conditioned_sampling(tmp_path: Path) -> None:
    # Class "vowels" texts are made of a/e/o, class "consonants" of k/t/s: the label alone says what follows.
    rng = random.Random(0)
    rows = [("".join(rng.choice(chars) for _ in range(rng.randint(4, 9))), label)
            for _ in range(300) for chars, label in (("aeo", "vowels"), ("kts", "consonants"))]
    data = write_csv(tmp_path / "letters.csv", rows)
    run = tmp_path / "run"
    proc = run_cli("classify", "train", str(data), "--out", str(run), *SMALL, "--max-epochs", "8",
                   "--lr", "5e-3", "--lm-weight", "1.0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["best"]["accuracy"] >= 0.95
    proc = run_cli("classify", "predict", str(run), "aoeeao", "tsktk", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["vowels", "consonants"]
    assert len(lines[0].split("\t")) == 5  # two (label, probability) pairs, then the text
    proc = run_cli("classify", "predict", str(run), "-", "--json", input="oooa\n\nkkst\n")
    assert [json.loads(line)["label"] for line in proc.stdout.splitlines()] == ["vowels", "consonants"]
    proc = run_cli("classify", "eval", str(run), str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["accuracy"] >= 0.95 and len(result["confusion"]) == 2
    proc = run_cli("classify", "eval", str(run), str(data))
    assert "confusion" in proc.stdout and "macro-F1" in proc.stdout
    proc = run_cli("info", str(run))  # a classifier's summary: its classes and validation accuracy
    assert proc.returncode == 0 and "consonants, vowels" in proc.stdout and "accuracy" in proc.stdout, proc.stderr
    for label, allowed in (("vowels", set("aeo")), ("consonants", set("kts"))):
        proc = run_cli("sample", str(run), "--label", label, "--length", "30", "--greedy")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout.strip()
        assert text and set(text) <= allowed, text
    proc = run_cli("sample", str(run), "--label", "nonsense")
    assert proc.returncode == 2 and "vowels" in proc.stderr and "Traceback" not in proc.stderr


def test_fine_tune_a_language_model_then_sample_and_classify(tiny_run: Path, order_csv: Path, tmp_path: Path) -> None:
    lm = rnngen.load(str(tiny_run))
    run = tmp_path / "ft"
    proc = run_cli("classify", "train", str(order_csv), "--from", str(tiny_run), "--out", str(run),
                   "--max-epochs", "10", "--lr", "5e-3", "--unfreeze-every", "20", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["best"]["accuracy"] >= 0.9
    gen = rnngen.load(str(run))
    assert gen.tokenizer.to_dict() == lm.tokenizer.to_dict()  # the language model's tokenizer is kept
    assert gen.labels == gen.classes == ["negative", "positive"]
    text = gen.sample("The ", length=80, seed=0)
    assert len(text) == 80 and set(text) <= set(lm.tokenizer.to_dict()["chars"])
    assert gen.classify(["it was not good"])[0]["label"] == "negative"
    # The fine-tuned encoder moved away from the language model's (unfreezing reached the embedding).
    assert not torch.equal(gen.model.encoder.rnn.weight_hh_l0, lm.model.encoder.rnn.weight_hh_l0)


def test_fine_tuning_may_change_dropout_but_not_the_network(tiny_run: Path, order_csv: Path, tmp_path: Path) -> None:
    hidden = rnngen.load(str(tiny_run)).model.config.hidden
    trainer = prepare_classifier([str(order_csv)], tmp_path / "a", base=str(tiny_run),
                                 **{"dropout": 0.3, "hidden": hidden})  # the base's own size passes
    assert trainer.model.config.dropout == 0.3 and trainer.model.lm_head.dropout.p == 0.3
    with pytest.raises(InputError, match=f"--hidden {2 * hidden} would change the network"):
        prepare_classifier([str(order_csv)], tmp_path / "b", base=str(tiny_run), **{"hidden": 2 * hidden})


def test_fitting_the_bag_counts_against_the_time_budget(order_csv: Path, tmp_path: Path) -> None:
    """The bag's fit is training: the run's clock starts with it (a minute on long texts), none without one."""
    options = {"hidden": 16, "emb_dim": 8, "layers": 1, "device": "cpu", "max_time": 60.0}
    assert prepare_classifier([str(order_csv)], tmp_path / "bag", **options).pos.elapsed > 0
    assert prepare_classifier([str(order_csv)], tmp_path / "none", **options, ngrams=0).pos.elapsed == 0


def test_the_bag_is_refitted_on_the_validation_texts_and_validated_without_them(tmp_path: Path) -> None:
    """The kept bag has seen every labelled text; the validation scores come from its fit without the
    validation texts. Labels here are noise: only a bag that saw a text knows its label."""
    rng = random.Random(0)
    rows = [("".join(rng.choices("abcdefghij", k=12)), rng.choice("AB")) for _ in range(200)]
    data = write_csv(tmp_path / "noise.csv", rows)
    trainer = prepare_classifier([str(data)], tmp_path / "run", **{"hidden": 16, "emb_dim": 8, "layers": 1},
                                 max_steps=1, device="cpu")
    head, targets = trainer.model.classifier, torch.from_numpy(trainer.val.targets)
    with torch.no_grad():
        kept = head.bag_logits(pad_bags(trainer.val.bags))
    kept_right = float((kept.argmax(1) == targets).float().mean())
    held_out_right = float((trainer.val_bag_logits.argmax(1) == targets).float().mean())
    assert kept_right > 0.9 and held_out_right < 0.75, (kept_right, held_out_right)
    trainer.run()  # and evaluation mixes in the held-out logits: validation accuracy near chance, not ~1
    assert trainer.last_val["accuracy"] < 0.75


def test_a_checkpoint_with_both_heads_round_trips(order_csv: Path, tmp_path: Path) -> None:
    trainer = prepare_classifier([str(order_csv)], tmp_path / "run", **{"hidden": 16, "emb_dim": 8,
                                 "layers": 1}, max_steps=20, device="cpu", lm_vote=0)
    trainer.run()
    saved = trainer.model.state_dict()
    gen = rnngen.load(str(tmp_path / "run" / "last"))
    loaded = gen.model.state_dict()
    assert any(k.startswith("heads.classifier.") for k in loaded) and "lm_head.bias" in loaded
    for key, value in saved.items():  # loading (and sampling) leaves the weights as trained
        assert torch.equal(value.cpu(), loaded[key]), key
    text_vocab = gen.model.config.text_vocab_size
    assert torch.isinf(gen.stepper().b_out[text_vocab:]).all()  # label tokens are never generated
    assert torch.isinf(gen.start("good").logits[0, text_vocab:]).all()
    assert torch.isfinite(gen.model.lm_head.bias).all()
    texts = ["not good", "good not at all"]
    assert trainer.model.classifier.ngrams > 0  # the default (auto) classifier also reads bags of n-grams
    bags = pad_bags([bag_of_ngrams(gen.tokenizer.encode(t), trainer.model.classifier.ngrams) for t in texts])
    with torch.no_grad():
        expected = torch.softmax(trainer.model.eval().classify(*pad(
            [trainer.train.inputs[0][:1].tolist() + list(gen.tokenizer.encode(t)) for t in texts]), bags), -1)
    got = gen.classify(texts, top=2)
    for probs, result in zip(expected, got):
        assert result["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_interrupted_run_resumes_exactly(order_csv: Path, tmp_path: Path, ema: float) -> None:
    # Both random regularisers on: their draws must continue exactly where the interrupted run stopped.
    # With --ema the moving average of the weights, which is what is evaluated, must continue too.
    options = dict(**{"hidden": 16, "emb_dim": 8, "layers": 1, "weight_drop": 0.2}, max_steps=60,
                   eval_every=25, device="cpu", lm_weight=0.5, token_dropout=0.2, ema=ema)
    straight = prepare_classifier([str(order_csv)], tmp_path / "a", **options)
    straight.run()
    stop = threading.Event()

    def stop_at_37(event: object) -> None:
        if getattr(event, "kind", "") == "step" and getattr(event, "step", 0) == 37:
            stop.set()

    first = prepare_classifier([str(order_csv)], tmp_path / "b", callback=stop_at_37, stop=stop, **options)
    assert first.run().stopped == "interrupted"
    resumed = prepare_classifier([], tmp_path / "b", resume=True)
    assert resumed.pos.step == 37
    resumed.run()
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["val_accuracy"] for r in a] == [r["val_accuracy"] for r in b]


def test_weight_average_by_hand() -> None:
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0], 1):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))  # 0.5 from the first update on: (1 + 1) / 11 < 0.5
        expected = decay * expected + (1 - decay) * value
    assert average.average[0].item() == pytest.approx(expected)
    with average.swapped_in():
        assert layer.weight.item() == pytest.approx(expected)
    assert layer.weight.item() == 4.0  # the trained weights are back


def test_ema_keeps_the_averaged_weights_in_best(order_csv: Path, tmp_path: Path) -> None:
    trainer = prepare_classifier([str(order_csv)], tmp_path / "run", **{"hidden": 16, "emb_dim": 8,
                                 "layers": 1}, max_steps=40, eval_every=40, device="cpu", ema=0.95)
    trainer.run()
    best = load_checkpoint(tmp_path / "run" / "best", "cpu")[0].state_dict()  # as saved (no -inf label logits)
    trained = trainer.model.state_dict()
    names = [name for name, _ in trainer.model.named_parameters()]
    assert names and all(torch.equal(best[n], a) for n, a in zip(names, trainer.average.average))
    assert not all(torch.equal(best[n], trained[n]) for n in names)
    proc = run_cli("classify", "train", str(order_csv), "--out", str(tmp_path / "bad"), "--ema", "1.5")
    assert proc.returncode == 2 and "--ema" in proc.stderr and "Traceback" not in proc.stderr


def test_bidirectional_classifies_but_refuses_to_generate(order_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "bi"
    proc = run_cli("classify", "train", str(order_csv), "--out", str(run), "--bidirectional", *SMALL,
                   "--max-epochs", "4", "--lr", "5e-3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["best"]["accuracy"] >= 0.9
    proc = run_cli("sample", str(run))
    assert proc.returncode == 2 and "bidirectional" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("classify", "predict", str(run), "it was not good").stdout.startswith("negative")


@pytest.mark.parametrize("rows, message", [
    ([("a text", "only")] * 5, "at least 2"),
    ([("", "x"), ("", "y")], "empty"),
])
def test_unusable_data_is_a_one_line_error(rows: list[tuple[str, str]], message: str, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "bad.csv", rows)
    proc = run_cli("classify", "train", str(data), "--out", str(tmp_path / "run"), *SMALL)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_classify_on_a_plain_language_model_says_what_to_do(tiny_run: Path) -> None:
    proc = run_cli("classify", "predict", str(tiny_run), "some text")
    assert proc.returncode == 2 and "classify train" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_label_and_classify_commands(order_csv: Path, tmp_path: Path) -> None:
    from rnngen.chat import ChatSession, Info, Notice, Problem
    from rnngen.config import SampleConfig

    trainer = prepare_classifier([str(order_csv)], tmp_path / "run", **{"hidden": 32, "emb_dim": 16,
                                 "layers": 1}, max_epochs=4, lr=5e-3, device="cpu")
    trainer.run()
    gen = rnngen.load(str(tmp_path / "run"))
    session = ChatSession(gen, SampleConfig(length=10, seed=0))
    assert list(session.handle("/label")) == [Info("labels: negative, positive")]
    assert isinstance(next(iter(session.handle("/label angry"))), Problem)
    assert [type(e) for e in session.handle("/label positive")] == [Notice]
    expected = gen.start(label="positive")
    assert torch.equal(session.cursor.logits, expected.logits)  # the conversation starts from the label token
    (info,) = session.handle("/classify good it was not")
    assert isinstance(info, Info) and info.text.startswith("positive")


def test_guided_logits_by_hand() -> None:
    from rnngen.generate import guided_logits

    cond = torch.tensor([[2.0, 1.0, float("-inf")]])
    free = torch.tensor([[1.0, 2.0, 0.0]])
    lc, lf = torch.log_softmax(cond, -1), torch.log_softmax(free, -1)
    torch.testing.assert_close(guided_logits(cond, free, 1.0), lc)
    torch.testing.assert_close(guided_logits(cond, free, 0.0)[:, :2], lf[:, :2])
    got = guided_logits(cond, free, 3.0)
    torch.testing.assert_close(got[:, :2], (3 * lc - 2 * lf)[:, :2])
    assert got[0, 2] == float("-inf")  # what the label excludes stays excluded, never NaN


def test_label_dropout_reads_a_share_of_lm_texts_without_their_label(order_csv: Path, tmp_path: Path) -> None:
    trainer = prepare_classifier([str(order_csv)], tmp_path / "run", **{"hidden": 16, "emb_dim": 8,
                                 "layers": 1}, max_steps=1, device="cpu", label_dropout=0.25)
    newline = int(trainer.tokenizer.encode("\n")[0])
    label_ids = set(range(trainer.model.config.text_vocab_size, trainer.model.config.vocab_size))
    every = np.arange(len(trainer.train))
    first = trainer._lm_inputs(every, epoch=0)
    unlabelled = [seq for seq in first if seq[0] == newline]
    assert 0.2 < len(unlabelled) / len(first) < 0.3
    assert all(seq[0] in label_ids for seq in first if seq[0] != newline)
    # the same text after the first token, the label or the newline
    assert all(np.array_equal(a[1:], b[1:]) for a, b in zip(first, trainer.train.lm_inputs))
    second = trainer._lm_inputs(every, epoch=1)
    assert [s[0] for s in second] != [s[0] for s in first]  # a new draw each epoch...
    assert [s[0] for s in trainer._lm_inputs(every, epoch=0)] == [s[0] for s in first]  # ...fixed by (seed, epoch)


def test_guidance_makes_samples_more_typical_of_their_label(tmp_path: Path) -> None:
    """Label "more_x" writes x 70% of the time, "more_y" 30%: guidance 3 must push both further apart
    (to about 93% and 7% for a model that learnt the frequencies), the same through every path."""
    rng = random.Random(0)
    rows = [("".join("x" if rng.random() < share else "y" for _ in range(12)), label)
            for _ in range(400) for share, label in ((0.7, "more_x"), (0.3, "more_y"))]
    run = tmp_path / "run"
    proc = run_cli("classify", "train", str(write_csv(tmp_path / "xy.csv", rows)), "--out", str(run), *SMALL,
                   "--max-epochs", "20", "--patience", "20", "--lr", "1e-2", "--lm-weight", "1.0",
                   "--label-dropout", "0.2", "--preset", "plain", "-q")
    assert proc.returncode == 0, proc.stderr
    gen = rnngen.load(str(run))

    def share_of_x(label: str, guidance: float) -> float:
        text = "".join(gen.sample_many(60, label=label, length=12, temperature=1.0, seed=0, guidance=guidance))
        return text.count("x") / len(text)

    plain_x, plain_y = share_of_x("more_x", 1.0), share_of_x("more_y", 1.0)
    guided_x, guided_y = share_of_x("more_x", 3.0), share_of_x("more_y", 3.0)
    assert 0.58 < plain_x < 0.8 and 0.2 < plain_y < 0.42, (plain_x, plain_y)
    assert guided_x > plain_x + 0.1 and guided_y < plain_y - 0.1, (guided_x, guided_y)
    # One stream (the cursor tracked), a batch of one, and the plain path: the same text.
    one = gen.sample(label="more_x", length=12, temperature=1.0, seed=5, guidance=3.0)
    assert one == gen.sample_many(1, label="more_x", length=12, temperature=1.0, seed=5, guidance=3.0)[0]
    from rnngen.loaded import LoadedModel as Generator

    plain = Generator.load(str(run), fast=False)
    assert one == plain.sample(label="more_x", length=12, temperature=1.0, seed=5, guidance=3.0)
    proc = run_cli("sample", str(run), "--label", "more_y", "--guidance", "3", "--num-samples", "3", "-n", "12",
                   "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 3
    for args, message in ((["--guidance", "2"], "give --label too"), (["--label", "more_x", "--guidance", "-1"],
                                                                      "--guidance")):
        proc = run_cli("sample", str(run), *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("smoothing", [0.0, 0.4])
def test_label_smoothing_caps_the_confidence_it_trains_towards(tmp_path: Path, smoothing: float) -> None:
    # An easy task learned to the end: without smoothing the model grows sure of every answer; with
    # smoothing s over 2 classes the loss is lowest at probability 1 - s/2 (0.8), and training stops there
    # (a little below: weight decay).
    rng = random.Random(0)
    rows = [(letter * rng.randint(2, 6) + "".join(rng.choices("xyz", k=3)), letter.upper())
            for letter in "ab" for _ in range(100)]
    data = write_csv(tmp_path / "easy.csv", rows)
    trainer = prepare_classifier([str(data)], tmp_path / "run", **{"hidden": 16, "emb_dim": 8,
                                 "layers": 1, "dropout": 0.0}, max_steps=300, device="cpu", lm_weight=0,
                                 head_dropout=0.0, lr=1e-2, label_smoothing=smoothing, patience=None,
                                     preset="plain")  # the recurrent head alone: no bag beside it
    trainer.run()
    results = rnngen.load(str(tmp_path / "run" / "last")).classify([text for text, _ in rows])
    assert [r["label"] for r in results] == [label for _, label in rows]
    mean = sum(r["probability"] for r in results) / len(results)
    if smoothing:
        assert 1 - smoothing / 2 - 0.06 < mean < 1 - smoothing / 2 + 0.01
    else:
        assert mean > 0.97


def test_label_log_likelihoods_read_each_text_after_each_label() -> None:
    """log p(text | label): the label token, the text and the newline that ends it, summed token by token;
    texts of different lengths batched together give what each gives alone."""
    tok = CharTokenizer.fit(["abc not good\n"])
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=16, emb_dim=8, layers=2))
    model = model.with_label_tokens(["neg", "pos"]).eval()
    model.heads["classifier"] = ClassifierHead(model.encoder.output_size, ["neg", "pos"], 0.0)
    texts = ["not good", "a", "good not abc abc"]
    seqs = encode_texts(tok, texts, 256).seqs
    got = label_log_likelihoods(model, tok, seqs, torch.device("cpu"))
    assert got.shape == (3, 2)
    for i, text in enumerate(texts):
        for j, label in enumerate(["neg", "pos"]):
            ids = torch.tensor([[model.config.label_id(label), *tok.encode(text), *tok.encode("\n")]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1])[0], -1)
            expected = logp[0].gather(1, ids[0, 1:, None]).sum()
            assert got[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    alone = label_log_likelihoods(model, tok, seqs[1:2], torch.device("cpu"))
    torch.testing.assert_close(alone[0], got[1], atol=1e-5, rtol=1e-5)


def test_the_checkpoint_classifies_with_the_language_models_vote(order_csv: Path, tmp_path: Path) -> None:
    """With --lm-vote W the scores are the head's log-probabilities + W (log p(text | label) + log prior);
    auto picks W from the grid on the validation set and keeps it in the checkpoint."""
    options = dict(**{"hidden": 16, "emb_dim": 8, "layers": 1}, max_steps=60, eval_every=30,
                   device="cpu", ngrams=0)  # the head and the vote alone: a confident bag would drown the vote
    fixed = prepare_classifier([str(order_csv)], tmp_path / "fixed", lm_vote=0.5, **options)
    fixed.run()
    gen = rnngen.load(str(tmp_path / "fixed" / "best"))
    assert gen.config["classify"]["lm_vote"] == 0.5
    texts = ["not good", "good not at all", "the food was not good"]
    seqs, cpu = encode_texts(gen.tokenizer, texts, 256).seqs, torch.device("cpu")
    head = torch.log_softmax(predict_logits(gen.model, seqs, cpu), -1)
    lm = label_log_likelihoods(gen.model, gen.tokenizer, seqs, cpu)
    prior = torch.tensor(gen.config["classify"]["log_prior"])
    assert prior.exp().sum().item() == pytest.approx(1.0)
    expected = torch.softmax(head + 0.5 * (lm + prior), -1)
    assert not torch.allclose(expected, torch.softmax(head, -1), atol=1e-3)  # the vote moves the probabilities
    for probs, result in zip(expected, gen.classify(texts, top=2)):
        assert result["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert result["label"] == gen.model.classifier.classes[int(probs.argmax())]
    head_alone = gen.classify(texts, top=2, lm_vote=0)
    for probs, result in zip(torch.softmax(head, -1), head_alone):
        assert result["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    evaluated = run_cli("classify", "eval", str(tmp_path / "fixed" / "best"), str(order_csv), "--json",
                        "--lm-vote", "0")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["lm_vote"] == 0.0, evaluated.stderr
    auto = prepare_classifier([str(order_csv)], tmp_path / "auto", **options)
    auto.run()
    metrics = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_lm_vote"] in VOTE_GRID for r in metrics)
    kept = rnngen.load(str(tmp_path / "auto" / "best")).config
    best = next(r for r in metrics if r["step"] == kept["training"]["best_step"])
    assert kept["classify"]["lm_vote"] == best["val_lm_vote"]
    off = prepare_classifier([str(order_csv)], tmp_path / "off", lm_vote=0, **options)
    assert off.votes == () and off.evaluate()["lm_vote"] == 0.0


def test_bag_of_ngrams_counts_each_ngram_once_per_bucket() -> None:
    buckets, counts = bag_of_ngrams(np.array([1, 2, 1, 2]), 2)
    assert counts.sum() == 4 + 3  # four unigrams, three bigrams
    assert sorted(counts.tolist()) == [1, 2, 2, 2]  # 1, 2, (1 2) twice each; (2 1) once
    assert (np.diff(buckets) > 0).all()  # sorted, distinct
    again, _ = bag_of_ngrams(np.array([2, 1]), 2)
    assert set(again.tolist()) < set(buckets.tolist())  # the same n-grams, the same buckets
    assert len(bag_of_ngrams(np.array([], dtype=np.int64), 3)[0]) == 0


def test_a_bag_of_characters_beside_the_tokens_hashes_apart() -> None:
    """A subword model's bag also holds the text's character n-grams: token ids equal to the characters' code
    points still land in other buckets, and the counts add up."""
    text = "abab"
    points = np.array([ord(c) for c in text])
    tokens, _ = bag_of_ngrams(points, 2)
    both, counts = bag_of_ngrams(points, 2, text, 3)
    assert counts.sum() == (4 + 3) + (4 + 3 + 2)  # token 1-2-grams; character 1-3-grams
    # Four token buckets (a, b, ab, ba), and six of characters apart from them (the same four, aba, bab).
    assert len(tokens) == 4 and set(tokens.tolist()) < set(both.tolist()) and len(both) == 4 + 6


def test_the_bag_share_is_the_one_with_the_lowest_validation_loss() -> None:
    """Each part is sure and right on one half of the texts, unsure and wrong on the other: every share from
    1/8 to 7/8 classifies all four right (accuracy cannot choose), the loss picks the even mix. A part that
    knows nothing gets no share."""
    from rnngen.classify import best_bag_share
    from rnngen.model import ClassifierHead

    head = ClassifierHead(4, ["a", "b"], ngrams=1)
    targets = torch.tensor([0, 0, 1, 1])
    recurrent = torch.tensor([[6.0, 0.0], [6.0, 0.0], [0.5, 0.0], [0.5, 0.0]])  # sure and right; barely wrong
    bag = torch.tensor([[0.0, 0.5], [0.0, 0.5], [0.0, 6.0], [0.0, 6.0]])  # barely wrong; sure and right
    mixed = [(head.mix(recurrent, bag, i / 8).argmax(1) == targets).all() for i in range(1, 8)]
    assert all(mixed)
    assert best_bag_share(head, recurrent, bag, targets) == 0.5
    right = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 6.0], [0.0, 6.0]])
    assert best_bag_share(head, torch.zeros(4, 2), right, targets) == 1.0


def test_the_bag_reads_what_the_recurrent_part_does_not(tmp_path: Path) -> None:
    """The label is the last word of each text, beyond the 8 characters the recurrent part reads (--max-len 8):
    without the bag of n-grams a classifier is at chance; with it, right on held-out texts."""
    rng = random.Random(0)
    filler = ["lorem", "ipsum", "dolor", "sit", "amet", "magna", "sed", "quis", "nisi", "ut", "enim", "minim"]

    def rows(n: int) -> list[tuple[str, str]]:
        return [(" ".join(rng.choice(filler) for _ in range(8)) + (" alpha" if i % 2 else " omega"),
                 "a" if i % 2 else "o") for i in range(n)]

    train, test = write_csv(tmp_path / "train.csv", rows(400)), write_csv(tmp_path / "test.csv", rows(100))
    accuracy = {}
    for ngrams in ("0", "3"):
        run = tmp_path / f"run{ngrams}"
        proc = run_cli("classify", "train", str(train), "--out", str(run), *SMALL, "--max-len", "8", "--ngrams",
                       ngrams, "--max-epochs", "4", "--lm-weight", "0", "-q")
        assert proc.returncode == 0, proc.stderr
        result = run_cli("classify", "eval", str(run), str(test), "--json")
        accuracy[ngrams] = json.loads(result.stdout)["accuracy"]
    assert accuracy["0"] < 0.7 and accuracy["3"] >= 0.95, accuracy
    shares = [json.loads(line).get("val_bag_share") for line in (tmp_path / "run3" / "metrics.jsonl").open()]
    assert shares[-1] is not None and shares[-1] > 0  # the validation set chose to listen to the bag
