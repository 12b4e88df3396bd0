"""The installed `rnngen` command, end to end, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY, rnngen_command, run_cli


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = ("import sys\nfrom rnngen.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "sample" in proc.stdout
    proc = run_cli("sample", "--help")
    assert proc.returncode == 0 and "--temperature" in proc.stdout and "Examples" in proc.stdout


def test_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "rnngen", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "rnngen" in proc.stdout


def test_train_sample_eval_info_plot(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("train", str(prose_corpus), "--out", str(run), "--max-steps", "40", "--eval-every", "20",
                   *TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # --json: stdout holds exactly one JSON object
    assert result["steps"] == 40 and result["best"]["bits_per_char"] > 0
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "trainer_state.json").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "sample" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])  # --json: no samples

    proc = run_cli("sample", str(run), "--prompt", "The ", "--length", "50", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The ") and len(proc.stdout) >= 50
    assert proc.stderr == ""  # stdout is the text and nothing else
    again = run_cli("sample", str(run), "--prompt", "The ", "--length", "50", "--seed", "3")
    assert again.stdout == proc.stdout

    proc = run_cli("sample", str(run), "-t", "0.5", "-t", "1.2", "--num-samples", "2", "-n", "20", "--seed", "1")
    assert proc.returncode == 0 and proc.stderr.count("--- temperature") == 4

    proc = run_cli("eval", str(run), str(prose_corpus), "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert abs(metrics["bits_per_char"] * 0.693147 - metrics["nats_per_char"]) < 1e-3
    # every token is scored but for fewer than 16 at the very end (the text is read in 16 parallel lanes)
    assert len(prose_corpus.read_text()) - 16 <= metrics["tokens"] <= len(prose_corpus.read_text()) - 1

    proc = run_cli("info", str(run))
    assert proc.returncode == 0 and "lstm 1x32" in proc.stdout and "best validation" in proc.stdout
    info = json.loads(run_cli("info", str(run), "--json").stdout)  # the summary shown, as numbers
    assert info["steps"] == 40 and len(info["history"]) == 2 and info["model"]["hidden"] == 32
    assert f"{info['best']['bits_per_char']:.4f} bits/char" in proc.stdout

    proc = run_cli("plot", str(run), "-o", str(tmp_path / "curve.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def words(text: str) -> str:
    """Text with its whitespace collapsed: the terminal shows a tab as spaces (the built-in corpus indents code with
    tabs)."""
    return " ".join(text.split())


def test_builtin_default_corpus(tmp_path: Path) -> None:
    proc = run_cli("train", "--max-steps", "6", "--eval-every", "3", *TINY, "--eval-max-tokens", "2000",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "built-in corpus" in proc.stderr
    assert "a sample" in proc.stderr and len(proc.stdout.strip()) > 20
    assert (tmp_path / "checkpoints" / "builtin" / "best" / "config.json").is_file()
    # Someone watching sees a sample at each evaluation (200 tokens), also kept in metrics.jsonl.
    records = [json.loads(line) for line in (tmp_path / "checkpoints/builtin/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all(len(r["sample"]) >= 150 for r in records)
    assert "sample at step 3" in proc.stderr and "sample at step 6" in proc.stderr
    assert words(records[1]["sample"].strip().splitlines()[0]) in words(proc.stderr)
    info = run_cli("info", str(tmp_path / "checkpoints/builtin"))
    assert "sample at step 6" in info.stdout
    assert words(records[1]["sample"].strip().splitlines()[-1]) in words(info.stdout)
    proc = run_cli("train", "--max-steps", "3", "--eval-every", "3", *TINY, "--eval-max-tokens", "2000", "-q",
                   cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "checkpoints" / "builtin-2").is_dir()  # never overwrites
    assert "sample" not in (tmp_path / "checkpoints/builtin-2/metrics.jsonl").read_text()  # --quiet: none


def test_subword_tokenizer_end_to_end(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("train", str(prose_corpus), "--out", str(run), "--tokenizer", "unigram", "--vocab-size", "400",
                   "--max-steps", "10", "--eval-every", "10", *TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # nats per char is nats per token spread over the characters each token covers
    assert result["best"]["nats_per_char"] < result["best"]["loss"]
    proc = run_cli("sample", str(run), "--prompt", "The 😀 ", "-n", "20", "--seed", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("The 😀 ")


def test_offline_named_dataset_fails_with_a_hint(tmp_path: Path) -> None:
    proxy = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    proc = run_cli("train", "tinyshakespeare", "--out", str(tmp_path / "r"), cwd=tmp_path, env=proxy)
    assert proc.returncode == 2
    assert "could not download tinyshakespeare" in proc.stderr and "pass a text file" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sigint_saves_and_resume_continues(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([rnngen_command(), "train", str(prose_corpus), "--out", str(run), "--max-steps",
                             "100000", "--eval-every", "10", *TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "rnngen train --resume --out" in err and "Traceback" not in err
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    stopped_at = state["position"]["step"]
    assert stopped_at >= 10 and not (run / ".lock").exists()
    proc = run_cli("train", "--resume", "--out", str(run), "--max-steps", str(stopped_at + 5), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == stopped_at + 5
    os.kill(os.getpid(), 0)  # the test process itself is unharmed
