"""Shared fixtures: an isolated cache, the installed `rnngen` command, small corpora written to disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton's kernels (rnngen.triton_step) run in its interpreter on CPU tensors: set before
# anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("RNNGEN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
HOOKS = Path(__file__).resolve().parent / "hooks"  # test hooks, kept out of rnngen's own code
sys.path.insert(0, str(HOOKS))


def nan_hook_env(spec: str) -> dict[str, str]:
    """The environment of a process (and its torchrun workers) whose loss turns NaN at the steps of ``spec``
    ("STEP[@RANK],...": see hooks/nan_hook.py)."""
    return {"RNNGEN_TEST_NAN_AT_STEP": spec,
            "PYTHONPATH": os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture
def nan_at(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``nan_at("12")``: in this process, the training loss turns NaN at step 12 (see hooks/nan_hook.py)."""
    import nan_hook

    return lambda spec: nan_hook.install(spec, monkeypatch.setattr)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("RNNGEN_CACHE_DIR", str(cache))
    return cache


def rnngen_command() -> str:
    """The installed console script (next to this Python), as a user would run it."""
    script = Path(sys.executable).with_name("rnngen")
    found = str(script) if script.exists() else shutil.which("rnngen")
    if not found:
        pytest.fail("the rnngen command is not installed; pip install the project first")
    return found


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([rnngen_command(), *args], capture_output=True, text=True, cwd=cwd, input=input,
                          timeout=timeout, env={**os.environ, **(env or {})})


def pattern_text(repeats: int = 60) -> str:
    """An order-dependent language: a^n b^n for n = 1..6, cycling. Fully determined by what came before."""
    block = " ".join("a" * n + "b" * n for n in range(1, 7)) + "\n"
    return block * repeats


@pytest.fixture
def pattern_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "pattern.txt"
    path.write_text(pattern_text(), encoding="utf-8")
    return path


@pytest.fixture
def prose_corpus(tmp_path: Path) -> Path:
    """About 60 kB of English prose from Python's help pages (always available offline)."""
    from rnngen.corpora import builtin_text

    path = tmp_path / "prose.txt"
    path.write_text(builtin_text()[:60_000], encoding="utf-8")
    return path


TINY = ["--hidden", "32", "--emb-dim", "16", "--layers", "1", "--batch-size", "8", "--seq-len", "32",
        "--warmup-steps", "5"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained run directory shared by read-only tests (trained once per session)."""
    from rnngen.corpora import builtin_text

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text(builtin_text()[:60_000], encoding="utf-8")
    run = root / "run"
    os.environ.setdefault("RNNGEN_CACHE_DIR", str(root / "cache"))
    # --preset plain: a fixed base for the tests that build on it (tests/test_choose.py tests the choosing).
    proc = run_cli("train", str(corpus), "--out", str(run), "--max-steps", "60", "--eval-every", "30", *TINY,
                   "--preset", "plain", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return run
