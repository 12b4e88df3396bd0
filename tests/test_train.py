from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen.checkpoint import read_metrics, run_lock
from rnngen.errors import InputError, TrainingError
from rnngen.training import prepare_run, train_from_options

TINY = dict(hidden=32, emb_dim=16, layers=1, batch_size=8, seq_len=32, warmup_steps=5, dropout=0.0, emb_dropout=0.0)


def test_learns_an_order_dependent_language(tmp_path: Path, pattern_corpus: Path) -> None:
    """a^n b^n for n = 1..6 in turn: every next character is determined by the order of what came before.

    A unigram model scores ln(3)-ish; only a model that counts and remembers reaches near zero.
    """
    result = train_from_options([str(pattern_corpus)], tmp_path / "run", hidden=64, emb_dim=16, layers=1,
                                batch_size=16, seq_len=64, lr=1e-2, warmup_steps=10, max_steps=300,
                                eval_every=50, dropout=0.0, emb_dropout=0.0)
    assert result.best_val["loss"] < 0.05, result.best_val
    gen = rnngen.load(str(tmp_path / "run"))
    text = gen.sample("aaabbb aaaabbbb ", length=30, greedy=True)
    assert text.startswith("aaaaabbbbb aaaaaabbbbbb\na")


def test_samples_at_evaluations_leave_the_run_unchanged(tmp_path: Path, pattern_corpus: Path) -> None:
    """sample_length: each evaluation samples from the model as it is then. The sampler has its own random
    numbers, so the run (its dropout masks and state resets) is the one it would be without samples."""
    options = dict(hidden=64, emb_dim=16, layers=1, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=10,
                   max_steps=300, eval_every=100, dropout=0.0, emb_dropout=0.05)
    events = []
    prepare_run([str(pattern_corpus)], tmp_path / "a", callback=events.append, sample_length=100, **options).run()
    train_from_options([str(pattern_corpus)], tmp_path / "b", **options)
    with_samples, without = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["val_loss"] for r in with_samples] == [r["val_loss"] for r in without]
    assert [r["train_loss"] for r in with_samples] == [r["train_loss"] for r in without]
    samples = [e.sample for e in events if e.kind == "eval"]
    assert len(samples) == 3 and [r["sample"] for r in with_samples] == samples
    assert all(len(s) == 100 for s in samples) and "sample" not in without[0]
    # The last sample shows the language learnt: its second line (the first to start from a carried state,
    # which the sampler reads to the end at temperature 0.8) is the a^n b^n block.
    block = pattern_corpus.read_text().splitlines()[0]
    assert samples[-1].split("\n")[1] == block, samples[-1]


def stop_at(step: int, stop: threading.Event):
    def callback(event) -> None:
        if event.kind == "step" and event.step == step:
            stop.set()
    return callback


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, prose_corpus: Path, ema: float) -> None:
    options = dict(TINY, dropout=0.1, emb_dropout=0.1, state_reset=0.3, max_steps=40, eval_every=10, ema=ema)
    full = train_from_options([str(prose_corpus)], tmp_path / "full", **options)
    stop = threading.Event()
    part = prepare_run([str(prose_corpus)], tmp_path / "part", stop=stop, callback=stop_at(17, stop), **options)
    assert part.run().stopped == "interrupted"
    assert part.pos.step == 17
    resumed = train_from_options([str(prose_corpus)], tmp_path / "part", resume=True)
    assert resumed.steps == full.steps == 40
    full_curve = [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(tmp_path / "full")]
    part_curve = [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(tmp_path / "part")]
    assert [s for s, _, _ in part_curve] == [10, 20, 30, 40]
    for (s1, t1, v1), (s2, t2, v2) in zip(full_curve, part_curve):
        assert s1 == s2 and v1 == pytest.approx(v2, abs=1e-6)
    # the weights themselves end up the same
    a, b = rnngen.load(str(tmp_path / "full" / "last")), rnngen.load(str(tmp_path / "part" / "last"))
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_ema_evaluates_and_keeps_the_average(tmp_path: Path, prose_corpus: Path, nan_at) -> None:
    """--ema: the moving average of the weights is what is evaluated and kept in best/, and a NaN roll-back
    takes the average back to the snapshot with the rest."""
    nan_at("25")
    trainer = prepare_run([str(prose_corpus)], tmp_path / "run", **TINY, max_steps=30, eval_every=30, ema=0.9)
    trainer.run()
    assert trainer.pos.nan_retries == 1
    best = rnngen.load(str(tmp_path / "run" / "best")).model
    names = [name for name, _ in trainer.model.named_parameters()]
    assert all(torch.equal(best.state_dict()[n], a) for n, a in zip(names, trainer.average.average))
    assert not all(torch.equal(best.state_dict()[n], p) for n, p in zip(names, trainer.model.parameters()))
    assert trainer.average.updates == 30  # rolled back to the snapshot at the start (not 25 + 30)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_state_reset_starts_windows_from_a_fresh_state(tmp_path: Path, prose_corpus: Path, share: float) -> None:
    """--state-reset 1: every window is read from a zero state; 0: the state carries over."""
    trainer = prepare_run([str(prose_corpus)], tmp_path / "run", **TINY, state_reset=share, precision="fp32")
    trainer._train_step()
    x, y = trainer.batches.batch(trainer.pos.epoch, trainer.pos.index)
    with torch.no_grad():
        logits, _ = trainer.model(x)  # from a fresh state, with the weights the next step starts from
        fresh = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert (trainer._train_step() == pytest.approx(fresh, rel=1e-6)) == (share == 1.0)
    assert trainer.batches.fresh_lanes(3, 5, 0.25).tolist() == trainer.batches.fresh_lanes(3, 5, 0.25).tolist()
    shares = torch.stack([trainer.batches.fresh_lanes(0, i, 0.25) for i in range(200)]).float().mean()
    assert 0.2 < shares < 0.3


def test_a_run_saved_before_state_resets_resumes_without_them(tmp_path: Path, prose_corpus: Path) -> None:
    """A trainer state without ``state_reset`` (written before the option existed) resumes carrying always."""
    options = dict(TINY, state_reset=0.0, max_steps=20, eval_every=10)
    full = train_from_options([str(prose_corpus)], tmp_path / "full", **options)
    stop = threading.Event()
    part = prepare_run([str(prose_corpus)], tmp_path / "old", stop=stop, callback=stop_at(7, stop), **options)
    assert part.run().stopped == "interrupted"
    saved = tmp_path / "old" / "last" / "trainer_state.json"
    state = json.loads(saved.read_text())
    del state["train_config"]["state_reset"]
    saved.write_text(json.dumps(state))
    resumed = train_from_options([str(prose_corpus)], tmp_path / "old", resume=True)
    assert resumed.best_val["loss"] == pytest.approx(full.best_val["loss"], abs=1e-6)


def test_resume_without_corpus_uses_the_recorded_one(tmp_path: Path, prose_corpus: Path) -> None:
    train_from_options([str(prose_corpus)], tmp_path / "run", **TINY, max_steps=10, eval_every=5)
    result = train_from_options([], tmp_path / "run", resume=True, max_steps=20)
    assert result.steps == 20
    other = tmp_path / "other.txt"
    other.write_text(prose_corpus.read_text() + "changed")
    with pytest.raises(InputError, match="corpus differs"):
        prepare_run([str(other)], tmp_path / "run", resume=True)


def test_existing_run_is_not_overwritten(tmp_path: Path, prose_corpus: Path) -> None:
    train_from_options([str(prose_corpus)], tmp_path / "run", **TINY, max_steps=5, eval_every=5)
    with pytest.raises(InputError, match="--resume"):
        prepare_run([str(prose_corpus)], tmp_path / "run", **TINY)


def test_early_stopping(tmp_path: Path, prose_corpus: Path) -> None:
    # a learning rate far too high makes validation loss stop improving quickly
    result = train_from_options([str(prose_corpus)], tmp_path / "run", **dict(TINY, warmup_steps=0), lr=3.0,
                                max_steps=400, eval_every=5, patience=2)
    assert result.stopped == "early_stop" and result.steps < 400
    records = read_metrics(tmp_path / "run")
    best = min(r["val_loss"] for r in records)
    assert all(r["val_loss"] >= best for r in records[-2:])


def test_nan_loss_rolls_back_with_lower_lr(tmp_path: Path, prose_corpus: Path, nan_at) -> None:
    nan_at("12")
    events = []
    trainer = prepare_run([str(prose_corpus)], tmp_path / "run", callback=events.append, **TINY, max_steps=20,
                          eval_every=10)
    result = trainer.run()
    assert result.steps == 20
    nan_events = [e for e in events if e.kind == "nan"]
    assert len(nan_events) == 1 and "step 12" in nan_events[0].message
    assert trainer.pos.lr_scale == 0.5 and trainer.pos.nan_retries == 1
    assert all(r["val_loss"] == r["val_loss"] for r in read_metrics(tmp_path / "run"))  # no NaN recorded


def test_nan_every_time_stops_and_keeps_best(tmp_path: Path, prose_corpus: Path, nan_at) -> None:
    nan_at(",".join(str(s) for s in range(10, 40)))
    trainer = prepare_run([str(prose_corpus)], tmp_path / "run", **TINY, max_steps=40, eval_every=10,
                          max_nan_retries=2)
    best_before = None
    with pytest.raises(TrainingError, match="NaN"):
        trainer.run()
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    best_before = best["training"]["step"]
    assert best_before == 10
    rnngen.load(str(tmp_path / "run"))  # still loads


def test_lock_refuses_a_second_run_and_clears_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run):
        with pytest.raises(InputError, match="another training run"):
            with run_lock(run):
                pass
    (run / ".lock").write_text(f"{os.uname().nodename} 999999")  # a dead process
    with run_lock(run):
        assert (run / ".lock").exists()
    assert not (run / ".lock").exists()
