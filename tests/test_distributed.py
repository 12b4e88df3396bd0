"""Distributed training: real `torchrun` processes (gloo on the CPU) against a single process.

Two ranks with a global batch of 8 take 4 lanes each; averaged by DDP, their gradients are those of
the single process with the whole batch, so the two runs must follow the same curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rnngen
from rnngen.checkpoint import read_metrics
from rnngen.data import eval_windows

from conftest import TINY, nan_hook_env, run_cli

# No dropout (each rank draws its own masks) and fp32 (bf16 rounds a batch of 4 and one of 8
# differently), so that the distributed run can match the single process to float precision.
EXACT = [*TINY, "--dropout", "0", "--emb-dropout", "0", "--precision", "fp32", "--max-steps", "150",
         "--eval-every", "25", "--device", "cpu"]
# A NaN loss at step 3 on rank 1 only must roll back both ranks, as step 3 does in one process.
NAN_ON_RANK_1, NAN = nan_hook_env("3@1"), nan_hook_env("3")


def torchrun(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    """``torchrun --nproc_per_node=2 -m rnngen ...``; --standalone picks a free port."""
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
               "-m", "rnngen", *args]
    # One thread per process: two torch processes on two cores would otherwise slow each other down.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, **kwargs)  # type: ignore[call-overload]


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def worker(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of torchrun's worker process with this rank."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone, or not ours
            if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker with rank {rank} appeared")


def test_ranks_share_the_validation_lanes() -> None:
    """Each rank reads its own lanes of the validation text (some none); together, what one process reads."""
    tokens = np.arange(3001, dtype=np.uint16)
    whole = list(eval_windows(tokens, seq_len=50, lanes=5))
    for world_size in (2, 3, 7):
        parts = [list(eval_windows(tokens, 50, lanes=5, rank=r, world_size=world_size)) for r in range(world_size)]
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([part[i][0] for part in parts if part]), x)
            assert torch.equal(torch.cat([part[i][1] for part in parts if part]), y)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return rnngen.load(str(run / "last")).model.state_dict()


def assert_same_curve(single: Path, distributed: Path) -> None:
    a, b = read_metrics(single), read_metrics(distributed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [25, 50, 75, 100, 125, 150]
    for x, y in zip(a, b):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5), x["step"]
        assert y["val_tokens"] == x["val_tokens"]  # every validation token scored once, over both ranks
    wa, wb = weights(single), weights(distributed)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The corpus, and the reference run: one process, the whole batch."""
    from rnngen.corpora import builtin_text

    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    corpus.write_text(builtin_text()[:60_000], encoding="utf-8")
    proc = run_cli("train", str(corpus), "--out", str(root / "single"), *EXACT, "-q",
                   env={"OMP_NUM_THREADS": "1", **NAN})
    assert proc.returncode == 0, proc.stderr
    return corpus, root / "single"


def test_two_processes_train_as_one(single: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, reference = single
    run = tmp_path / "run"
    code, out, err = finish(torchrun("train", str(corpus), "--out", str(run), *EXACT, env=NAN_ON_RANK_1))
    assert code == 0, err
    assert_same_curve(reference, run)
    final = read_metrics(run)[-1]["train_loss"]
    assert final == pytest.approx(read_metrics(reference)[-1]["train_loss"], rel=1e-5)
    # one writer: one run directory, each evaluation logged once, the lock released
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # one speaker: the headline, the NaN warning and the summary come once, from rank 0
    assert err.count("training on corpus.txt") == 1 and "x 2 processes" in err
    assert err.count("loss became NaN/inf at step 3") == 1
    assert err.count("done (max steps) after 150 steps") == 1


def test_stop_on_one_rank_then_resume_with_torchrun(single: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone stops both ranks after the same step, saved; --resume continues the run
    exactly (the carried state of both ranks' lanes included), ending where one process ends."""
    corpus, reference = single
    run = tmp_path / "run"
    launcher = torchrun("train", str(corpus), "--out", str(run), *EXACT, "-q", env=NAN_ON_RANK_1)
    rank1 = worker(launcher, 1)
    while not (run / "metrics.jsonl").exists() and launcher.poll() is None:
        time.sleep(0.02)
    os.kill(rank1, signal.SIGTERM)
    code, _, err = finish(launcher)
    assert code == 0, err
    assert err.count("stopped at step") == 1 and "torchrun [the same options] -m rnngen train --resume" in err
    stopped_at = json.loads((run / "last" / "trainer_state.json").read_text())["position"]["step"]
    assert 25 <= stopped_at < 150
    code, _, err = finish(torchrun("train", "--resume", "--out", str(run), "-q", env={}))
    assert code == 0, err
    assert_same_curve(reference, run)


def test_batch_size_must_split_between_ranks(single: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = single
    code, _, err = finish(torchrun("train", str(corpus), "--out", str(tmp_path / "run"), *TINY, "--batch-size", "7",
                                   "--device", "cpu", env={}))
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: --batch-size 7 (the global batch) does not split evenly between 2 processes; "
                     "use a multiple of 2"]
    assert not (tmp_path / "run").exists()


def test_two_processes_fine_tune_as_one(single: tuple[Path, Path], tmp_path: Path) -> None:
    """--from under torchrun: every rank starts from the same base, grown by the same new characters."""
    corpus, base = single
    new_corpus = tmp_path / "umlauts.txt"
    new_corpus.write_text(corpus.read_text(encoding="utf-8")[:30_000].replace("e", "ë"), encoding="utf-8")
    options = ["--from", str(base), *EXACT, "--max-steps", "50", "-q"]
    proc = run_cli("train", str(new_corpus), "--out", str(tmp_path / "one"), *options, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    code, _, err = finish(torchrun("train", str(new_corpus), "--out", str(tmp_path / "two"), *options, env={}))
    assert code == 0, err
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [25, 50]
    for x, y in zip(a, b):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)
    assert "ë" in rnngen.load(str(tmp_path / "two")).tokenizer.to_dict()["chars"]
