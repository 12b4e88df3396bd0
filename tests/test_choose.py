"""--preset auto: the rules that choose a run's configuration, and what a run does with the choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen import choose
from rnngen.choose import Choice, CorpusStats
from rnngen.config import TrainConfig
from rnngen.corpora import Corpus
from rnngen.loop import lr_at

from conftest import run_cli

SMALL = {"hidden": 16, "emb_dim": 8, "layers": 1, "batch_size": 4, "seq_len": 16, "warmup_steps": 2}


def stats_of(text: str, tmp_path: Path) -> CorpusStats:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return CorpusStats.of(Corpus((path,), "utf-8", "strict"))


def test_characters_whatever_the_alphabet_unless_the_user_says(tmp_path: Path) -> None:
    english = stats_of("the quick brown fox jumps over the lazy dog\n" * 200, tmp_path)
    choice = Choice()
    choose.choose_tokenizer(english, {}, choice)
    assert choice.options == {"tokenizer": "char"}
    # 4,000 distinct CJK characters, evenly used: still characters (subwords stalled on Chinese: choose.py).
    cjk = stats_of("".join(chr(0x4E00 + i % 4000) for i in range(40_000)), tmp_path)
    assert cjk.alphabet == 4000
    choice = Choice()
    choose.choose_tokenizer(cjk, {}, choice)
    assert choice.options == {"tokenizer": "char"} and "4,000 distinct characters" in choice.reasons[0]
    choice = Choice()
    choose.choose_tokenizer(cjk, {"tokenizer": "bpe"}, choice)  # what the user gives wins
    assert "tokenizer" not in choice.options


def test_the_model_size_follows_the_device() -> None:
    cpu, cuda = Choice(), Choice()
    choose.choose_model(torch.device("cpu"), {}, cpu)
    choose.choose_model(torch.device("cuda"), {"hidden": 128}, cuda)
    assert cpu.options == {"layers": 2, "hidden": 256} and cuda.options == {"layers": 3}


# Speeds and sizes of 2-layer models as measured on the 2-core CPU (steps of 64x128 per second, parameters).
SPEED = {256: 4.0, 384: 2.5, 512: 1.6}
PARAMETERS = {256: 850_000, 384: 1_900_000, 512: 3_300_000}


def timed_size(seconds: float | None, given: dict | None = None,
               half_batch_speedup: float = 1.2) -> tuple[Choice, list[tuple[int, int]], float | None]:
    """What a CPU run with this budget chooses, the sizes and batches it probed, and the speed it returned; a step
    of half the batch runs ``half_batch_speedup`` times as fast."""
    choice, probed = Choice(), []

    def speed_of(layers: int, hidden: int, batch: int) -> float:
        probed.append((hidden, batch))
        return SPEED[hidden] * 2 / layers * (half_batch_speedup if batch == 32 else 1)

    speed = choose.choose_model(torch.device("cpu"), given or {}, choice, seconds, 64, 128, speed_of,
                                lambda layers, hidden: PARAMETERS[hidden] * layers // 2)
    return choice, probed, speed


def test_a_timed_cpu_model_grows_while_it_reads_enough_tokens_per_parameter() -> None:
    # 60 s: even 2x256's speed would read 384's parameters only ~1.6 times each: 384 is not probed.
    choice, probed, speed = timed_size(60)
    assert (choice.options["hidden"], probed, speed) == (256, [(256, 64), (256, 32)], 4.0)
    # 300 s: 384 is worth a probe, but at its own speed it reads ~3.2 tokens per parameter (< 5).
    choice, probed, _ = timed_size(300)
    assert (choice.options["hidden"], probed) == (256, [(256, 64), (384, 64), (256, 32)])
    # 1,200 s: 384 reads ~13; 512 at its speed reads ~4.8: 384, said with its reason.
    choice, probed, speed = timed_size(1200)
    assert (choice.options, probed[:3], speed) == ({"layers": 2, "hidden": 384}, [(256, 64), (384, 64), (512, 64)],
                                                   2.5)
    assert "tokens per parameter" in choice.reasons[-1]
    # 3,600 s: 512 reads ~14.
    assert timed_size(3600)[0].options["hidden"] == 512


def test_a_timed_cpu_run_halves_its_batch_where_half_makes_more_updates() -> None:
    # A step of 32 rows in 0.65 of the time of 64 (as measured on the 2-core CPU): 1.54x the updates at 77% of
    # the tokens per second. The size is chosen first, by what it reads at the full batch.
    choice, probed, speed = timed_size(1200, half_batch_speedup=1.54)
    assert (choice.options["hidden"], choice.options["batch_size"], speed) == (384, 32, pytest.approx(2.5 * 1.54))
    assert probed[-1] == (384, 32) and "1.5x the updates, 77% of the tokens" in choice.reasons[-1]
    # At 1.3x the updates (65% of the tokens per second) the batch stays; a GPU keeps it, without a probe.
    assert "batch_size" not in timed_size(1200, half_batch_speedup=1.3)[0].options
    cuda = Choice()
    choose.choose_model(torch.device("cuda"), {}, cuda, 120, 64, 128, lambda *_: 10.0, lambda *_: 1)
    assert "batch_size" not in cuda.options
    # A given batch is kept and not probed at half.
    choice, probed, _ = timed_size(60, {"batch_size": 64}, half_batch_speedup=1.54)
    assert "batch_size" not in choice.options and probed == [(256, 64)]


def test_a_given_size_is_kept_and_probed_as_it_is() -> None:
    choice, probed, speed = timed_size(3600, {"hidden": 384})
    assert ("hidden" not in choice.options, probed, speed) == (True, [(384, 64), (384, 32)], 2.5)
    choice, probed, _ = timed_size(3600, {"layers": 4})  # the given layers are what the rule sizes
    assert "layers" not in choice.options and choice.options["hidden"] == 384
    assert {hidden for hidden, _ in probed} == {256, 384, 512}
    assert timed_size(None)[1:] == ([], None)  # no time budget: nothing probed, 2x256


def test_the_probe_takes_the_median_step_over_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(choose.time, "perf_counter", lambda: clock[0])

    def steps_of(durations: list[float]) -> tuple[float, int]:
        left = iter(durations)
        taken = []

        def step() -> None:
            taken.append(next(left))
            clock[0] += taken[-1]

        return choose.median_seconds(step), len(taken)

    # One step held up by another process does not decide the speed; three steps over a second are enough.
    assert steps_of([0.5, 4.0, 0.5] + [0.5] * 40) == (0.5, 3)
    # Fast steps are timed until a second has passed; very fast ones until the cap.
    assert steps_of([0.125] * 40) == (0.125, 8)
    assert steps_of([2**-7] * 40) == (2**-7, choose.PROBE_STEPS[1])
    # A slow first step (caches still cold) weighs as one of five.
    assert steps_of([0.5] + [0.125] * 40) == (0.125, 5)


def test_the_default_budget_reads_the_text_a_few_times_within_bounds() -> None:
    assert choose.default_steps(train_tokens=500_000, tokens_per_step=8192) == round(20 * 500_000 / 8192)
    assert choose.default_steps(10_000, 8192) == choose.MIN_STEPS
    assert choose.default_steps(10**10, 8192) == choose.MAX_STEPS


def test_the_recipe_for_each_budget() -> None:
    config = TrainConfig()  # neither --max-steps nor --max-time: bounded steps, and early stopping
    choice = Choice()
    expected, passes = choose.choose_recipe(config, {}, 500_000, None, choice)
    assert choice.options["max_steps"] == expected == choose.default_steps(500_000, 8192)
    assert choice.options["patience"] == choose.DEFAULT_PATIENCE and passes == pytest.approx(20, rel=0.01)
    assert "dropout" not in choice.options  # 20 passes: dropout stays (the model can overfit)
    assert choice.options["eval_every"] == round(expected / choose.EVALUATIONS)

    timed = TrainConfig(max_time=120)  # 120 s at 4 steps/s on a 465 kB corpus: ~9 passes, still underfitting
    choice = Choice()
    expected, passes = choose.choose_recipe(timed, {"max_time": 120}, 420_000, 4.0, choice)
    assert expected == 480 and "max_steps" not in choice.options and "patience" not in choice.options
    assert choice.options["dropout"] == 0.0 and choice.options["schedule"] == "wsd"
    # Evaluations together read what 5% of the budget allows (at three times the training rate per token).
    assert choice.options["eval_max_tokens"] == int(120 * 0.05 * 4.0 * 8192 * 3 / 10)
    choice = Choice()
    choose.choose_recipe(timed, {"max_time": 120, "dropout": 0.3, "schedule": "cosine"}, 420_000, 4.0, choice)
    assert "dropout" not in choice.options and "schedule" not in choice.options  # given options win


def test_wsd_holds_the_peak_then_decays_over_the_last_fifth() -> None:
    config = TrainConfig(schedule="wsd", warmup_steps=0, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(config, 10, 0.0) == pytest.approx(1e-3) and lr_at(config, 10, 0.8) == pytest.approx(1e-3)
    assert lr_at(config, 10, 0.9) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(config, 10, 1.0) == pytest.approx(1e-4)
    cosine = TrainConfig(schedule="cosine", warmup_steps=0, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(cosine, 10, 0.5) == pytest.approx(1e-3 * 0.55)


def test_max_time_alone_trains_until_the_time(tmp_path: Path, prose_corpus: Path) -> None:
    result = rnngen.train([str(prose_corpus)], out=str(tmp_path / "run"), max_time=4, **SMALL)
    assert result.stopped == "max_time" and result.elapsed >= 4
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["training"]
    assert config["train_config"]["max_steps"] is None  # no hidden cap on the steps


def test_the_printed_choice_is_what_was_trained_and_resume_keeps_it(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("train", str(prose_corpus), "--out", str(run), "--max-steps", "30", "--hidden", "24",
                   "--emb-dim", "8", "--batch-size", "4", "--seq-len", "16", "--dropout", "0.2", "--sample-length", "0")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("chosen for this data and budget: ")]
    assert len(said) == 1
    training = json.loads((run / "best" / "config.json").read_text())["training"]
    chosen = training["chosen"]
    assert said[0].endswith(chosen["line"])
    model = rnngen.load(str(run)).model.config
    # Options given win (hidden 24, dropout 0.2, 30 steps); the rest is the choice: 2 layers on the CPU, wsd.
    assert (model.hidden, model.dropout, model.layers) == (24, 0.2, 2) and "2x24 lstm" in chosen["line"]
    assert "hidden" not in chosen["options"] and "dropout" not in chosen["options"]
    assert training["train_config"]["schedule"] == "wsd" == chosen["options"]["schedule"]
    assert training["train_config"]["max_steps"] == 30
    info = run_cli("info", str(run))
    assert chosen["line"] in info.stdout
    resumed = run_cli("train", "--resume", "--out", str(run), "--max-steps", "40", "--sample-length", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert "chosen for this data" not in resumed.stderr  # nothing is chosen again
    again = json.loads((run / "best" / "config.json").read_text())["training"]
    assert again["chosen"] == chosen and again["train_config"]["schedule"] == "wsd" and again["step"] == 40


def test_plain_keeps_the_fixed_defaults(tmp_path: Path, prose_corpus: Path) -> None:
    result = rnngen.train([str(prose_corpus)], out=str(tmp_path / "run"), preset="plain", max_steps=5, **SMALL)
    training = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]
    assert "chosen" not in training and training["train_config"]["schedule"] == "cosine" and result.steps == 5


def test_the_thread_tuner_uses_one_thread_while_others_use_the_cpu() -> None:
    """Other processes' CPU use, as the machine reports it, decides: one thread above half a core, all the
    threads again once they use less than a quarter (between the two, nothing changes)."""
    from rnngen.runtime import ThreadTuner

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    load = [0.0]
    try:
        tuner = ThreadTuner(torch.device("cpu"), others=lambda: load[0])
        seen = []
        for second, others in enumerate([0.1, 0.1, 1.6, 1.8, 0.4, 0.4, 0.1, 0.0]):
            load[0] = others
            tuner.step_done(0.1, elapsed=float(second * tuner.CHECK))
            seen.append(torch.get_num_threads())
        assert seen == [2, 2, 1, 1, 1, 1, 2, 2]
        tuner.step_done(0.1, elapsed=7 * tuner.CHECK + 0.5)  # between looks: nothing is read or changed
        load[0] = 1.9
        assert torch.get_num_threads() == 2
        tuner.step_done(0.1, elapsed=9 * tuner.CHECK)
        assert torch.get_num_threads() == 1
        tuner.restore()
        assert torch.get_num_threads() == 2
        real = ThreadTuner(torch.device("cpu"))  # the machine's own numbers: a share of its cores
        sum(i * i for i in range(200_000))
        others = real._others_from_proc()
        assert others is None or 0.0 <= others <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_the_thread_tuner_stays_off_where_it_has_nothing_to_choose() -> None:
    from rnngen.runtime import ThreadTuner

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not ThreadTuner(torch.device("cpu")).enabled
        torch.set_num_threads(2)
        assert not ThreadTuner(torch.device("cuda")).enabled
    finally:
        torch.set_num_threads(before)


# -- classification --------------------------------------------------------------------------------------------

def test_short_texts_are_read_as_characters_and_long_ones_as_subwords() -> None:
    from rnngen.choose import LabelledStats, choose_classifier
    from rnngen.config import ClassifyConfig

    names = LabelledStats.of(["Nakamura", "Smith", "Ivanov"] * 100)
    choice = Choice()
    choose_classifier(names, ClassifyConfig(), {}, choice, new_model=True)
    assert choice.options["tokenizer"] == "char" and choice.options["ngrams"] == 4
    assert choice.options["token_dropout"] == 0.3 and choice.options["schedule"] == "wsd"
    # 300 texts, 240 to train in batches of 32: 8 steps an epoch; at least 3,000 steps, at most 50 epochs.
    assert choice.options["max_epochs"] == choose.UNTIMED_EPOCHS

    articles = LabelledStats.of([("the market rose as shares of the bank fell " * 10)[: 300 + i] for i in range(6000)])
    assert articles.median_chars >= choose.LONG_TEXT
    choice = Choice()
    choose_classifier(articles, ClassifyConfig(max_time=300), {}, choice, new_model=True)
    assert choice.options["tokenizer"] == "bpe" and choice.options["ngrams"] == 2
    assert choice.options["vocab_size"] == choose.SUBWORD_VOCAB  # 1.9M characters fill it
    assert choice.options["max_epochs"] == choice.options["patience"] == choose.TIMED_EPOCHS  # the time decides
    small = LabelledStats.of(["a long enough text about markets and banks, " * 3] * 50)
    choice = Choice()
    choose_classifier(small, ClassifyConfig(), {}, choice, new_model=True)
    assert choice.options["vocab_size"] < choose.SUBWORD_VOCAB  # a small data set cannot fill 8,000 pieces
    assert choice.options["vocab_size"] >= small.alphabet + choose.KEPT_PIECES  # a piece for each character and byte

    choice = Choice()  # what the user gives wins; fine-tuning keeps its base's tokenizer
    choose_classifier(articles, ClassifyConfig(), {"ngrams": 0, "max_epochs": 3}, choice, new_model=False)
    assert not {"tokenizer", "vocab_size", "ngrams", "max_epochs"} & set(choice.options)


def test_classify_train_says_what_it_chose_and_keeps_it(tmp_path: Path) -> None:
    rows = "".join(f"{'ab' * (i % 5 + 1)},{'x' if i % 2 else 'y'}\n" for i in range(60))
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + rows, encoding="utf-8")
    proc = run_cli("classify", "train", str(data), "--out", str(tmp_path / "run"), "--hidden", "16", "--emb-dim", "8",
                   "--layers", "1", "--max-epochs", "2", "--token-dropout", "0.1")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("chosen for this data and budget: ")]
    assert len(said) == 1 and "char + bag of 1-4-grams" in said[0] and "word dropout 0.1" in said[0], proc.stderr
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert config["heads"]["classifier"]["ngrams"] == 4
    assert config["classify"]["config"]["token_dropout"] == 0.1 and config["classify"]["config"]["max_epochs"] == 2
    assert said[0].endswith(config["training"]["chosen"]["line"])
    info = json.loads(run_cli("info", str(tmp_path / "run"), "--json").stdout)
    assert info["chosen"]["line"] == config["training"]["chosen"]["line"]
    plain = run_cli("classify", "train", str(data), "--out", str(tmp_path / "plain"), "--hidden", "16", "--emb-dim",
                    "8", "--layers", "1", "--max-epochs", "1", "--preset", "plain")
    assert plain.returncode == 0 and "chosen for" not in plain.stderr
    assert json.loads((tmp_path / "plain" / "last" / "config.json").read_text())["heads"]["classifier"]["ngrams"] == 0
