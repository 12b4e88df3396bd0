"""Bad input through the installed command: one line naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY, rnngen_command, run_cli


def assert_clean_error(proc, *phrases: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), lines[0]


BAD_FILES = {
    "empty": (b"", "is empty"),
    "blank": (b" \n\n\t  \n", "only whitespace"),
    "binary": (b"\x7fELF\x00\x00\x01", "NUL bytes"),
    "badutf8": (b"hello \xc3\x28 world", "not valid utf-8 at byte 6"),
    "utf16": (codecs.BOM_UTF16_LE + "hello there".encode("utf-16-le"), "--encoding utf-16"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_corpus_files(tmp_path: Path, name: str) -> None:
    content, phrase = BAD_FILES[name]
    path = tmp_path / f"{name}.txt"
    path.write_bytes(content)
    assert_clean_error(run_cli("train", str(path), "--out", str(tmp_path / "run")), phrase)
    assert not (tmp_path / "run" / "best").exists()


def test_bad_paths(tmp_path: Path) -> None:
    assert_clean_error(run_cli("train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("train", str(tmp_path / "empty"), "--out", str(tmp_path / "r")), "holds no files")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_clean_error(run_cli("train", str(fifo), "--out", str(tmp_path / "r")), "not a regular file")


def without_read_override() -> list[str]:
    """A command prefix under which file permissions apply: root keeps them only without CAP_DAC_*."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    proc = subprocess.run([*without_read_override(), rnngen_command(), "train", str(path), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "permission denied")


def test_corpus_shorter_than_a_window(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words of text\n")
    assert_clean_error(run_cli("train", str(path), "--out", str(tmp_path / "r")), "too few", "--batch-size")


@pytest.mark.parametrize("option, value, phrase", [
    ("--layers", "0", "layers"), ("--batch-size", "0", "batch-size"), ("--hidden", "-3", "hidden"),
    ("--dropout", "1.5", "dropout"), ("--lr", "nan", "lr"), ("--max-steps", "0", "max-steps"),
    ("--vocab-size", "100000", "vocab-size"), ("--val-fraction", "1", "val-fraction"),
    ("--state-reset", "1.5", "state-reset"), ("--min-lr-ratio", "-0.1", "min-lr-ratio"),
    ("--weight-drop", "1", "weight-drop"),
])
def test_impossible_training_options(tmp_path: Path, prose_corpus: Path, option: str, value: str,
                                     phrase: str) -> None:
    extra = ["--tokenizer", "bpe"] if option == "--vocab-size" else []
    proc = run_cli("train", str(prose_corpus), "--out", str(tmp_path / "r"), option, value, *extra)
    assert_clean_error(proc, phrase)


@pytest.mark.parametrize("args, phrase", [
    (["--temperature", "0"], "temperature"), (["-t", "nan"], "temperature"), (["-t", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"), (["--top-p", "1.5"], "top-p"), (["--top-k", "0"], "top-k"),
    (["--length", "-5"], "length"), (["--prompt", "\u20ac\u20ac\u20ac"], "no character this model knows"),
])
def test_impossible_sampling_options(tiny_run: Path, args: list[str], phrase: str) -> None:
    assert_clean_error(run_cli("sample", str(tiny_run), *args), phrase)


def test_unknown_prompt_characters_warn_but_work(tiny_run: Path) -> None:
    proc = run_cli("sample", str(tiny_run), "--prompt", "The \u20ac", "-n", "10", "--seed", "0")
    assert proc.returncode == 0 and "warning" in proc.stderr and "<unk>" in proc.stderr
    assert proc.stdout.startswith("The \u20ac")


def test_prompt_file(tiny_run: Path, tmp_path: Path) -> None:
    """--prompt-file reads the prompt as it is (a backslash stays one), from a file or stdin."""
    (tmp_path / "prompt.txt").write_text("The\nfile \\n", encoding="utf-8")
    args = ("sample", str(tiny_run), "-n", "30", "--seed", "2")
    from_file = run_cli(*args, "--prompt-file", str(tmp_path / "prompt.txt"))
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.startswith("The\nfile \\n") and len(from_file.stdout) > len("The\nfile \\n") + 20
    from_stdin = run_cli(*args, "--prompt-file", "-", input="The\nfile \\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout == from_file.stdout
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00")
    assert_clean_error(run_cli(*args, "--prompt-file", str(tmp_path / "binary.txt")), "NUL bytes")
    assert_clean_error(run_cli(*args, "--prompt-file", str(tmp_path / "missing.txt")), "prompt file not found")
    assert_clean_error(run_cli(*args, "--prompt-file", "-", input=""), "read nothing from stdin")
    assert_clean_error(run_cli(*args, "--prompt", "x", "--prompt-file", "-", input="y"), "not both")


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    assert_clean_error(run_cli("sample", str(tmp_path / "folder")), "not an rnngen checkpoint")
    assert_clean_error(run_cli("sample", str(tmp_path / "missing")), "checkpoint not found")
    (tmp_path / "file.txt").write_text("x")
    assert_clean_error(run_cli("info", str(tmp_path / "file.txt")), "not a checkpoint directory")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "gpt2"}')
    assert_clean_error(run_cli("sample", str(tmp_path / "foreign")), "not an rnngen checkpoint")


def test_truncated_weights(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_clean_error(run_cli("sample", str(run)), "truncated or corrupted")


def test_newer_format_version(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    config_path = run / "best" / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    assert_clean_error(run_cli("info", str(run)), "newer rnngen", "upgrade")


def test_weights_do_not_match_config(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    config_path = run / "best" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["hidden"] = 48
    config_path.write_text(json.dumps(config))
    assert_clean_error(run_cli("sample", str(run)), "do not match")


def test_damaged_config_json(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    (run / "best" / "config.json").write_text("{not json")
    assert_clean_error(run_cli("eval", str(run), str(run / "metrics.jsonl")), "not json")


def test_pickle_files_are_never_loaded(tiny_run: Path, tmp_path: Path) -> None:
    """A checkpoint with pickles crafted to run code on load: loading ignores them, the payload never runs."""
    import pickle

    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("pytorch_model.bin", "model.pt", "trainer_state.pt", "optimizer.pkl"):
        for sub in ("best", "last"):
            (run / sub / name).write_bytes(pickle.dumps(Payload()))
    assert run_cli("sample", str(run), "-n", "5", "--seed", "0").returncode == 0
    assert run_cli("info", str(run)).returncode == 0
    assert run_cli("train", "--resume", "--out", str(run), "--max-steps", "62", "-q").returncode == 0
    assert not marker.exists()


def test_second_run_on_same_directory_refuses(tmp_path: Path, prose_corpus: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{os.uname().nodename} {os.getpid()}")  # this live process holds it
    proc = run_cli("train", str(prose_corpus), "--out", str(run), *TINY, "--max-steps", "5")
    assert_clean_error(proc, "another training run")


def test_existing_run_needs_resume(tiny_run: Path, tmp_path: Path, prose_corpus: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    before = (run / "best" / "model.safetensors").read_bytes()
    assert_clean_error(run_cli("train", str(prose_corpus), "--out", str(run)), "--resume")
    assert (run / "best" / "model.safetensors").read_bytes() == before


BAD_LABELLED = {
    "empty.csv": (b"", "empty"),
    "binary.csv": (b"text,label\n\x00\x01,a\n", "NUL bytes"),
    "utf16.csv": (codecs.BOM_UTF16_LE + "text,label\nhi,a\n".encode("utf-16-le"), "--encoding utf-16"),
    "badrow.csv": (b"text,label\nhello,a\nworld\nagain,b\n", "line 3"),
    "nolabel.csv": (b"text,label\nhello,\nworld,\n", "line 2: no label"),
    "oneclass.csv": (b"text,label\nhello,a\nworld,a\n", "at least 2"),
    "badutf8.csv": (b"text,label\nhello,a\nw\xc3\x28rld,b\n", "line 3"),
    "nocolumn.csv": (b"words,label\nhello,a\nworld,b\n", "words"),
}


@pytest.mark.parametrize("name", sorted(BAD_LABELLED))
def test_bad_labelled_data(tmp_path: Path, name: str) -> None:
    content, phrase = BAD_LABELLED[name]
    path = tmp_path / name
    path.write_bytes(content)
    assert_clean_error(run_cli("classify", "train", str(path), "--out", str(tmp_path / "run")), phrase)
    assert not (tmp_path / "run").exists()
    if name == "nolabel.csv":  # skipping every row leaves nothing to learn from
        assert_clean_error(run_cli("classify", "train", str(path), "--skip-bad-rows", "--out", str(tmp_path / "run")),
                           "no usable rows")


def test_bad_classify_paths_and_options(tmp_path: Path, tiny_run: Path) -> None:
    data = tmp_path / "ok.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    out = ["--out", str(tmp_path / "r")]
    assert_clean_error(run_cli("classify", "train", str(tmp_path / "nope.csv"), *out), "not found")
    assert_clean_error(run_cli("classify", "train", str(data), "--max-len", "0", *out), "--max-len")
    assert_clean_error(run_cli("classify", "train", str(data), "--lm-weight", "-1", *out), "--lm-weight")
    assert_clean_error(run_cli("classify", "train", str(data), "--token-dropout", "1", *out), "--token-dropout")
    assert_clean_error(run_cli("classify", "train", str(data), "--label-smoothing", "-0.1", *out),
                       "--label-smoothing")
    for vote in ("-1", "many"):
        assert_clean_error(run_cli("classify", "train", str(data), "--lm-vote", vote, *out), "--lm-vote")
    assert_clean_error(run_cli("classify", "train", str(data), "--from", str(tmp_path), *out), "not an rnngen")
    assert_clean_error(run_cli("classify", "train", str(data), "--from", str(tiny_run), "--hidden", "64", *out),
                       "--hidden")
    assert_clean_error(run_cli("classify", "predict", str(tmp_path / "nope"), "text"), "not found")
    assert_clean_error(run_cli("classify", "predict", str(tiny_run), "--file", str(tmp_path / "none.txt")),
                       "not found")
    assert_clean_error(run_cli("classify", "predict", str(tiny_run)), "nothing to classify")
