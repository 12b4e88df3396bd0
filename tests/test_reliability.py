"""Nothing lost: atomic checkpoint writes, signals, kill -9 then resume, portable checkpoints."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen import checkpoint
from rnngen.config import ModelConfig
from rnngen.model import RNNModel
from rnngen.tokenizers import CharTokenizer

from conftest import TINY, rnngen_command, run_cli


def small_model(seed: int) -> tuple[RNNModel, CharTokenizer]:
    torch.manual_seed(seed)
    tok = CharTokenizer.fit(["abcdef ghij"])
    return RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=8, emb_dim=4)), tok


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "best"
    old_model, tok = small_model(0)
    checkpoint.save_checkpoint(target, old_model, tok, {"training": {"step": 1}})
    new_model, _ = small_model(1)

    def disk_full(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_json", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(target, new_model, tok, {"training": {"step": 2}})
    monkeypatch.undo()
    loaded, _, config, _ = checkpoint.load_checkpoint(target)
    assert config["training"]["step"] == 1
    for k, v in old_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary left behind


def test_crash_between_renames_falls_back_to_old(tmp_path: Path) -> None:
    model, tok = small_model(0)
    checkpoint.save_checkpoint(tmp_path / "best", model, tok, {})
    (tmp_path / "best").rename(tmp_path / ".best.old")  # as if killed between the two renames
    assert checkpoint.resolve_checkpoint_dir(tmp_path) == tmp_path / ".best.old"
    rnngen.load(str(tmp_path))


def start_training(run: Path, corpus: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([rnngen_command(), "train", str(corpus), "--out", str(run), *TINY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_saves_and_exits_zero(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    proc = start_training(run, prose_corpus, "--max-steps", "100000", "--eval-every", "10")
    wait_for(run / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "--resume" in err and "Traceback" not in err
    assert (run / "last" / "trainer_state.json").is_file()


def test_kill_9_then_resume_matches_uninterrupted(tmp_path: Path, prose_corpus: Path) -> None:
    """kill -9 loses at most the steps since the last periodic save; the resumed run ends where the
    uninterrupted one does, weights and all."""
    options = ["--max-steps", "300", "--eval-every", "100", "--save-every", "10", "--dropout", "0.1"]
    whole = run_cli("train", str(prose_corpus), "--out", str(tmp_path / "whole"), *TINY, *options, "-q")
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    proc = start_training(run, prose_corpus, *options)
    wait_for(run / "last" / "trainer_state.json")
    proc.kill()
    proc.wait()
    saved_step = json.loads((run / "last" / "trainer_state.json").read_text())["position"]["step"]
    assert saved_step % 10 == 0 and saved_step < 300
    resumed = run_cli("train", "--resume", "--out", str(run), "-q")  # also clears the dead run's lock
    assert resumed.returncode == 0, resumed.stderr
    a = rnngen.load(str(tmp_path / "whole" / "last")).model.state_dict()
    b = rnngen.load(str(run / "last")).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    final = [r for r in checkpoint.read_metrics(run) if r["step"] == 300]
    expected = [r for r in checkpoint.read_metrics(tmp_path / "whole") if r["step"] == 300]
    assert final[-1]["val_loss"] == pytest.approx(expected[0]["val_loss"], abs=1e-6)


def test_run_directory_is_portable(tiny_run: Path, tmp_path: Path) -> None:
    """Loading uses nothing outside the directory: a moved copy samples the same text."""
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tiny_run, moved)
    for name in ("config.json", "tokenizer.json"):
        assert str(tiny_run.parent) not in (moved / "best" / name).read_text()
    a = run_cli("sample", str(tiny_run), "-n", "40", "--seed", "5").stdout
    b = run_cli("sample", str(moved), "-n", "40", "--seed", "5").stdout
    assert a == b and len(a) > 10


def test_python_api_saves_on_ctrl_c(tmp_path: Path, prose_corpus: Path) -> None:
    """Ctrl-C (SIGINT) during `rnngen.train(...)` in a Python program stops the run after saving it, and the
    call returns a result that says so; the run then resumes from there."""
    run = tmp_path / "run"
    program = ("import json, sys, rnngen\n"
               f"result = rnngen.train([{str(prose_corpus)!r}], out={str(run)!r}, hidden=32, emb_dim=16, layers=1,"
               " batch_size=8, seq_len=32, warmup_steps=5, max_steps=100000, eval_every=10)\n"
               "print(json.dumps(result.to_dict()))\n")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(run / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    result = json.loads(out)
    assert result["stopped"] == "interrupted" and 10 <= result["steps"] < 100000
    saved = json.loads((run / "last" / "trainer_state.json").read_text())["position"]["step"]
    assert saved == result["steps"]  # saved at the step it stopped, not at the last evaluation
    resumed = rnngen.train([str(prose_corpus)], out=str(run), resume=True, max_steps=saved + 5)
    assert resumed.steps == saved + 5 and resumed.stopped == "max_steps"


def test_a_resume_point_comes_by_time_before_any_evaluation(tmp_path: Path, prose_corpus: Path) -> None:
    """--save-time: last/ is written by wall time too, so a run killed before its first evaluation (a slow
    machine, a big model) still resumes."""
    run = tmp_path / "run"
    proc = start_training(run, prose_corpus, "--max-steps", "100000", "--eval-every", "100000", "--save-time", "1")
    wait_for(run / "last" / "trainer_state.json")
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    assert not (run / "metrics.jsonl").exists()  # no evaluation yet
    step = json.loads((run / "last" / "trainer_state.json").read_text())["position"]["step"]
    assert step >= 1
    resumed = run_cli("train", "--resume", "--out", str(run), "--max-steps", str(step + 3), "-q", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == step + 3
