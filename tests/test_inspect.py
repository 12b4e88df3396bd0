"""`rnngen inspect`: surprisal scored as `rnngen eval` scores, cells that track text features, gate statistics,
the CLI on every architecture and tokenizer, bad input, and the HTML report in a real headless browser."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rnngen
import torch
from conftest import run_cli

from rnngen.config import ModelConfig
from rnngen.inspect import compute_features, inspect_text, step_layers, surprisal
from rnngen.model import RNNModel
from rnngen.runtime import evaluate
from rnngen.tokenizers import CharTokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "and", "said", "a", "dog", "ran", "to", "house", "with", "big", "red",
         "ball", "it", "was", "then", "we"]


def quotes_text(seed: int, chars: int = 40_000) -> str:
    """Lower-case words, with quoted runs of upper-case words: only the quote state tells the case of a
    word that follows a space."""
    rng = random.Random(seed)
    lines, n = [], 0
    while n < chars:
        words = [f'"{" ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(2, 5)))}"'
                 if rng.random() < 0.25 else rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        lines.append(" ".join(words) + "\n")
        n += len(lines[-1])
    return "".join(lines)


def tiny_model(arch: str, vocab: int, layers: int = 2, hidden: int = 6, scale: float = 1.0) -> RNNModel:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=vocab, arch=arch, emb_dim=5, hidden=hidden, layers=layers, dropout=0.0))
    with torch.no_grad():  # larger weights than the default: gates reach saturation, so the counts are not all 0
        for p in model.encoder.rnn.parameters():
            p.mul_(scale)
    return model.eval()


def train(tmp_path: Path, corpus: Path, name: str, *args: str) -> Path:
    run = tmp_path / name
    # One thread: a model this small trains faster so, and far faster on a busy machine.
    proc = run_cli("train", str(corpus), "--out", str(run), "--quiet", "--sample-length", "0", *args,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return run


def inspect_json(run: Path, file: Path, *args: str) -> dict[str, Any]:
    proc = run_cli("inspect", str(run), str(file), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cli(*args: str) -> tuple[int, str, str]:
    """`rnngen ARGS` run in this process (as the installed command runs it, without its start-up time)."""
    from click.testing import CliRunner

    from rnngen.cli import main

    result = CliRunner().invoke(main, list(args), prog_name="rnngen")
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints of 2-layer LSTM, GRU and plain RNN on characters, and an LSTM on bpe subwords (untrained:
    inspecting does not care how good a model is, and training each would take most of this file's time)."""
    from rnngen.checkpoint import save_checkpoint
    from rnngen.corpora import builtin_text
    from rnngen.tokenizers import fit_tokenizer

    root = tmp_path_factory.mktemp("inspect_runs")
    text = builtin_text()[:30_000] + Path(json.__file__).read_text(encoding="utf-8")
    runs = {}
    for name, arch, kind in (("lstm", "lstm", "char"), ("gru", "gru", "char"), ("rnn", "rnn", "char"),
                             ("bpe", "lstm", "bpe")):
        tok = fit_tokenizer([text], kind, vocab_size=400)
        runs[name] = root / name
        save_checkpoint(runs[name], tiny_model(arch, tok.vocab_size, hidden=16, scale=2.0), tok, {})
    return runs


# ----------------------------------------------------------------------------------------------- the encoder
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_step_by_step_layers_reproduce_the_models_logits(arch: str) -> None:
    model = tiny_model(arch, vocab=11, layers=2, hidden=7)
    tokens = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    expected, state = model(tokens[:, :10])
    expected2, _ = model(tokens[:, 10:], state)  # the state carried from one window to the next
    traces, mine = step_layers(model, tokens[:, :10])
    traces2, _ = step_layers(model, tokens[:, 10:], mine)
    for want, got in ((expected, traces), (expected2, traces2)):
        torch.testing.assert_close(model.lm_head(got[-1].h), want, atol=1e-5, rtol=1e-5)
    for s_model, s_mine in zip(state, mine):
        torch.testing.assert_close(s_mine, s_model, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_gate_statistics_match_a_computation_by_hand(arch: str) -> None:
    text = "the (quick) brown fox, \"jumps\" over the lazy dog.\n" * 6  # one lane: read from the start in one pass
    tok = CharTokenizer.fit([text])
    model = tiny_model(arch, tok.vocab_size, layers=2, hidden=4, scale=4.0)
    result = inspect_text(model, tok, text)
    ids = torch.from_numpy(tok.encode(text)[:-1].astype(np.int64))  # every token but the last is read
    rnn, sig = model.encoder.rnn, torch.sigmoid
    x = model.encoder.embedding.weight[ids].detach()
    counts: dict[tuple[int, str], list[torch.Tensor]] = {}
    for k in range(2):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}").detach(), getattr(rnn, f"weight_hh_l{k}").detach()
        b = getattr(rnn, f"bias_ih_l{k}").detach(), getattr(rnn, f"bias_hh_l{k}").detach()
        h, c, outs = torch.zeros(4), torch.zeros(4), []
        for t in range(len(ids)):
            pre_i, pre_h = w_ih @ x[t] + b[0], w_hh @ h + b[1]
            if arch == "lstm":  # rows: input, forget, cell candidate, output
                gates = {"input": sig(pre_i[0:4] + pre_h[0:4]), "forget": sig(pre_i[4:8] + pre_h[4:8]),
                         "output": sig(pre_i[12:16] + pre_h[12:16])}
                c = gates["forget"] * c + gates["input"] * torch.tanh(pre_i[8:12] + pre_h[8:12])
                h = gates["output"] * torch.tanh(c)
            else:  # rows: reset, update, new
                gates = {"reset": sig(pre_i[0:4] + pre_h[0:4]), "update": sig(pre_i[4:8] + pre_h[4:8])}
                n = torch.tanh(pre_i[8:12] + gates["reset"] * pre_h[8:12])
                h = (1 - gates["update"]) * n + gates["update"] * h
            for name, g in gates.items():
                counts.setdefault((k, name), []).append(g)
            outs.append(h)
        x = torch.stack(outs)
    assert result.steps == len(ids)
    some_saturated = False
    for (k, name), values in counts.items():
        g = torch.stack(values)
        left, right = (g < 0.1).double().mean(0).numpy(), (g > 0.9).double().mean(0).numpy()
        np.testing.assert_allclose(result.gates[k][name]["left"], left, atol=1e-12)
        np.testing.assert_allclose(result.gates[k][name]["right"], right, atol=1e-12)
        some_saturated |= bool(left.any() and right.any())
    assert some_saturated


def test_features_of_a_python_snippet() -> None:
    text = 'x = f("a(b", [1,\n    2])  # don\'t\ns = """(\n"""\n'
    names, values = compute_features(text, {"call": r"f\("})
    f = dict(zip(names, values))
    at = text.index
    assert f["inside_quotes"][at('"a')] == 1 and f["inside_quotes"][at('a(')] == 1
    assert f["inside_quotes"][at('", [')] == 0  # the closing quote is outside again
    assert f["inside_quotes"][at("'t")] == 0  # an apostrophe in a word opens no string
    assert f["inside_quotes"][at('"""') + 3] == 1 and f["inside_quotes"][text.rindex('"""')] == 0
    assert f["bracket_depth"][at("f(")] == 0 and f["bracket_depth"][at('("')] == 1
    assert f["bracket_depth"][at("a(") + 1] == 1  # a bracket inside a string does not count
    assert f["bracket_depth"][at("[1")] == 2 and f["bracket_depth"][at("2])") + 1] == 1
    assert f["indent"][at("2])")] == 4 and f["indent"][0] == 0
    assert f["line_position"][at("2])")] == 4 and f["to_line_end"][at("x = ")] == text.index("\n")
    assert f["to_line_end"][text.index("\n")] == 0
    assert f["word_start"][at("x")] == 1 and f["word_start"][at("on't")] == 0
    assert f["digit"][at("1")] == 1 and f["upper_case"].sum() == 0
    assert f["call"].tolist()[at("f("): at("f(") + 3] == [1, 1, 0]


# ----------------------------------------------------------------------------------------------- surprisal
@pytest.mark.parametrize("name", ["lstm", "bpe"])
def test_surprisal_summary_equals_rnngen_eval(name: str, small_runs: dict[str, Path], tmp_path: Path) -> None:
    from rnngen.corpora import builtin_text

    text = tmp_path / "text.txt"  # long enough for eval's 16 lanes, with characters the model never saw
    code_text = Path(json.__file__).read_text(encoding="utf-8")[:8000]
    text.write_text(builtin_text()[-12_000:] + "Ünïcode 🙂\n" + code_text, encoding="utf-8")
    code, out, err = cli("inspect", str(small_runs[name]), str(text), "--json")
    assert code == 0, err
    result = json.loads(out)
    code, out, err = cli("eval", str(small_runs[name]), str(text), "--json")
    assert code == 0, err
    expected = json.loads(out)
    for key in ("nats_per_char", "bits_per_char", "loss"):
        assert result["summary"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
    assert result["summary"]["tokens"] == expected["tokens"]
    loaded = rnngen.load(str(small_runs[name]))  # the same through the Python API's loaded model
    in_python = loaded.inspect(text.read_text(encoding="utf-8")).surprisal.summary
    assert in_python["nats_per_char"] == pytest.approx(loaded.evaluate(text.read_text(encoding="utf-8"))["nats_per_char"],
                                                       rel=1e-5)


def test_per_character_surprisal_adds_up_and_excludes_label_tokens() -> None:
    text = "Ünïcode ✓ text, with emoji 🙂 and more.\n" * 30
    tok = CharTokenizer.fit([text[:200]])  # some characters of the text are unknown to the model
    model = tiny_model("lstm", tok.vocab_size).with_label_tokens(["pos", "neg"]).eval()
    s = surprisal(model, tok, text, keep_chars=100)
    masked = tiny_model("lstm", tok.vocab_size).with_label_tokens(["pos", "neg"]).eval()
    with torch.no_grad():  # what `rnngen eval` scores with: label tokens never predicted as text
        masked.lm_head.bias[tok.vocab_size:] = float("-inf")
    expected = evaluate(masked, tok.encode(text), tok.char_lengths(), torch.device("cpu"))
    assert s.summary["nats_per_char"] == pytest.approx(expected["nats_per_char"], rel=1e-6)
    whole = surprisal(model, tok, text, keep_chars=len(text))  # per-character data is kept for what is kept only
    assert np.nansum(whole.per_char) == pytest.approx(s.summary["nats_per_char"] * s.summary["chars"], rel=1e-9)
    assert math.isnan(s.per_char[0]) and len(s.text) == len(s.per_char) == 100
    assert (s.top_ids[1:] < tok.vocab_size).all() and (s.top_ids[1:] >= 0).all()
    probs = [p for _, p in s.predictions(5)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    chars = s.characters()  # plain data, as a server would send it
    assert "".join(c["char"] for c in chars) == text[:100] and chars[0]["bits"] is None
    assert chars[5]["bits"] == pytest.approx(s.per_char[5] / math.log(2))
    assert chars[5]["predictions"] == s.predictions(5)


# ----------------------------------------------------------------------------------------------- long texts
def windowed_text() -> str:
    """Code and prose whose lines, quotes (triple ones too), brackets, escapes and regex matches cross the ends
    of tiny windows; a line longer than a window, and text with no newline at its end."""
    from rnngen.corpora import builtin_text

    code = Path(json.__file__).read_text(encoding="utf-8")[:2500]
    odd = ('s = """a (\n  b [\\"""\n' + "    x = f('it''s', \"don't\", [1,\n" + "        2]) " * 30 + "\n"
           + "\t\tÜnïcode 🙂 é\n" + "word " * 200 + "\n\n")
    return code + odd + builtin_text()[:2500] + odd + "end (no newline"


def spans_by_hand(per_char: np.ndarray, text: str, count: int = 5, width: int = 20) -> list[tuple[int, int, str]]:
    """The most surprising runs as the whole text's per-character data gives them: (start, line, text)."""
    sums = np.convolve(np.nan_to_num(per_char), np.ones(width), mode="valid")
    taken: list[int] = []
    for start in np.argsort(-sums, kind="stable").tolist():
        if all(abs(start - t) >= width for t in taken) and len(taken) < count:
            taken.append(start)
    return [(s, text.count("\n", 0, s) + 1, text[s: s + width]) for s in taken]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_many_tiny_windows_give_what_one_window_gives(kind: str) -> None:
    from rnngen.inspect import FeatureStream, _windows
    from rnngen.tokenizers import fit_tokenizer

    text = windowed_text()
    extra = {"call": r"\w+\(", "line_start": r"(?m)^\s*\w", "after_def": r"(?<=def )\w+", "end": r"k$"}
    names, whole = compute_features(text, extra)
    for size in (1, 2, 3, 7, 100):  # the features of each window, with what crosses its end carried
        stream = FeatureStream(extra)
        got = np.concatenate([stream.feed(w, ahead) for w, ahead in _windows([text], size, at_newline=False)], 1)
        bad = [name for name, a, b in zip(names, got, whole) if not np.array_equal(a, b)]
        assert not bad, (size, bad)
    tok = fit_tokenizer([text], kind, vocab_size=400)
    model = tiny_model("lstm", tok.vocab_size, hidden=8, scale=2.0)
    one = inspect_text(model, tok, text, features=extra, keep_chars=len(text), window=len(text))
    assert [(s["start"], s["line"], s["text"]) for s in one.surprisal.spans] == spans_by_hand(one.surprisal.per_char,
                                                                                              text)
    assert len(one.surprisal.lane_starts) >= 8 and one.surprisal.summary["chars"] > 0.99 * len(text)  # lanes cross too
    chunks = [text[i: i + 50] for i in range(0, len(text), 50)]  # read from a source in chunks, as a file is
    for size in (7, 61):
        many = inspect_text(model, tok, lambda: iter(chunks), features=extra, keep_chars=700, window=size)
        assert many.surprisal.summary == pytest.approx(one.surprisal.summary, rel=1e-12)
        assert many.surprisal.summary["tokens"] == one.surprisal.summary["tokens"]  # no piece cut differently
        np.testing.assert_allclose(many.correlations, one.correlations, rtol=1e-9, atol=1e-12)
        assert many.surprisal.spans == one.surprisal.spans and len(one.surprisal.spans) == 5
        kept = len(many.surprisal.text)
        assert many.surprisal.text == text[:kept] and 700 <= kept < 720
        np.testing.assert_allclose(many.surprisal.per_char, one.surprisal.per_char[:kept], rtol=1e-12)
        tokens = len(many.surprisal.top_ids)
        assert np.array_equal(many.surprisal.top_ids, one.surprisal.top_ids[:tokens])
        assert np.array_equal(many.kept_activations, one.kept_activations[:tokens])
        for layer_many, layer_one in zip(many.gates, one.gates):
            for gate, sides in layer_one.items():
                np.testing.assert_array_equal(layer_many[gate]["left"], sides["left"])


# ----------------------------------------------------------------------------------------------- the quotes cell
def test_a_cell_tracks_quotes_and_is_listed_first(tmp_path: Path) -> None:
    corpus, held_out = tmp_path / "quotes.txt", tmp_path / "held_out.txt"
    corpus.write_text(quotes_text(0), encoding="utf-8")
    held_out.write_text(quotes_text(1, chars=15_000), encoding="utf-8")
    run = train(tmp_path, corpus, "quotes", "--seed", "0", "--hidden", "32", "--emb-dim", "16", "--layers", "1",
                "--batch-size", "16", "--seq-len", "64", "--max-steps", "300", "--eval-every", "300", "--dropout", "0")
    listed = inspect_json(run, held_out, "--top", "2")["features"]["inside_quotes"]["cells"]
    from rnngen.inspect import inspect_checkpoint

    r = inspect_checkpoint(run, held_out).correlations[:, :, 0]  # inside_quotes is the first feature
    g, unit = np.unravel_index(np.nanargmax(np.abs(r)), r.shape)
    assert abs(r[g, unit]) >= 0.8
    assert (listed[0]["kind"], listed[0]["unit"]) == (("c", "h")[g], unit)
    assert listed[0]["r"] == pytest.approx(r[g, unit], abs=1e-4) and abs(listed[1]["r"]) <= abs(listed[0]["r"])


# ----------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn", "bpe"])
def test_inspect_runs_end_to_end(name: str, small_runs: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "code.py"
    text.write_text(Path(json.__file__).read_text(encoding="utf-8")[:6000], encoding="utf-8")
    report = tmp_path / "report.html"
    code, out, err = cli("inspect", str(small_runs[name]), str(text), "--json", "--html", str(report),
                         "--feature", r"keyword=\b(def|import)\b", "--layer", "2")
    assert code == 0, err
    result = json.loads(out)
    assert 0.9 * 6000 < result["summary"]["chars"] < 6000 and result["summary"]["bits_per_char"] > 0
    assert set(result["features"]) >= {"inside_quotes", "bracket_depth", "indent", "keyword"}
    cells = result["features"]["bracket_depth"]["cells"]
    assert len(cells) == 3 and all(c["layer"] == 2 and -1 <= c["r"] <= 1 for c in cells)
    want = {"lstm": {"input", "forget", "output"}, "gru": {"reset", "update"}, "rnn": set(), "bpe": {"input", "forget",
                                                                                                  "output"}}[name]
    assert [set(layer) - {"layer"} for layer in result["gates"]] == [want, want]
    for layer in result["gates"]:
        for gate in want:
            assert all(0 <= a and 0 <= b and a + b <= 1 for a, b in zip(layer[gate]["left"], layer[gate]["right"]))
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<link" not in page  # self-contained
    assert "def " in page  # the text is in the report


def test_terminal_view_and_png(small_runs: dict[str, Path], prose_corpus: Path, tmp_path: Path) -> None:
    png = tmp_path / "gates.png"
    code, out, err = cli("inspect", str(small_runs["lstm"]), str(prose_corpus), "--png", str(png), "--max-chars", "80")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("bits/char", "most surprising spans", "strongest cells per feature", "inside_quotes", "forget"):
        assert heading in out
    code, out, err = cli("inspect", str(small_runs["rnn"]), str(prose_corpus), "--png", str(png))
    assert code == 2 and "no gates" in err


def test_bad_input_is_one_line(small_runs: dict[str, Path], tmp_path: Path) -> None:
    run = str(small_runs["lstm"])
    empty, binary, good = tmp_path / "empty.txt", tmp_path / "blob.bin", tmp_path / "good.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 4)
    good.write_text("some text to read\n" * 10)
    proc = run_cli("inspect", run, str(tmp_path / "missing.txt"))  # once as the installed command
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    cases = [(run, str(empty), [], "empty"),
             (run, str(binary), [], "binary"),
             (str(tmp_path / "nope"), str(good), [], "checkpoint not found"),
             (run, str(good), ["--feature", "broken"], "NAME=REGEX"),
             (run, str(good), ["--feature", "x=(unclosed"], "invalid"),
             (run, str(good), ["--layer", "5"], "layer"),
             (run, str(good), ["--html", str(tmp_path / "no" / "such" / "dir.html")], "cannot write")]
    for checkpoint, file, extra, says in cases:
        code, _, err = cli("inspect", checkpoint, file, *extra)
        assert code == 2, (file, extra, err)
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_fast_enough_on_100_kb(small_runs: dict[str, Path]) -> None:
    from rnngen.checkpoint import load_checkpoint
    from rnngen.corpora import builtin_text

    model, tok, _, _ = load_checkpoint(small_runs["lstm"])
    text = builtin_text()[:100_000]
    start = time.perf_counter()
    inspect_text(model, tok, text)
    assert time.perf_counter() - start < 10  # interactive: about 1.5 s for this 2x16 LSTM on a 2-core CPU


# ----------------------------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _move_fd_above_9(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in,
    fd 4 out, NUL-separated JSON), with every console error and uncaught exception collected."""

    def __init__(self, profile: Path) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        # A small Python puts the pipes on fds 3 and 4, where Chromium looks for them, then becomes Chromium;
        # they are first moved above 9, so that neither is overwritten by the other's dup2.
        to_chrome, from_chrome = (_move_fd_above_9(fd) for fd in (to_chrome, from_chrome))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                                    "os.execv(sys.argv[3], sys.argv[3:])"), str(to_chrome), str(from_chrome),
             str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(to_chrome, from_chrome))
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message(deadline))

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def open(self, path: Path) -> None:
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_for("Page.loadEventFired")

    def hover(self, selector: str) -> None:
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                            "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0], "y": box[1]})
        self.evaluate("0")  # a round trip: the event has been handled

    def errors(self) -> list[str]:
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                found.append(params["entry"].get("text", ""))
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine: the HTML report is not checked in a browser "
                    "(Debian: apt-get install -y chromium)")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_html_report_works_in_a_headless_browser(browser: Browser, small_runs: dict[str, Path],
                                                 tmp_path: Path) -> None:
    text = tmp_path / "code.py"
    text.write_text(Path(json.__file__).read_text(encoding="utf-8")[:3000] + "\n</script>🙂 é\n", encoding="utf-8")
    report = tmp_path / "report.html"
    code, _, err = cli("inspect", str(small_runs["bpe"]), str(text), "--html", str(report), "--json")
    assert code == 0, err
    browser.open(report)
    chars = len(text.read_text(encoding="utf-8"))
    assert browser.evaluate("document.querySelectorAll('#surprisal span').length") == chars
    assert browser.evaluate("document.querySelectorAll('#cells span').length") == chars
    assert browser.evaluate("document.querySelector('button.cell.on') !== null")  # a cell is shown at load
    browser.hover("#surprisal span:nth-child(40)")
    tip = browser.evaluate("document.getElementById('tip').textContent")
    assert "bits" in tip and "the model predicted" in tip and "%" in tip
    browser.evaluate("document.querySelectorAll('button.cell')[1].click()")
    browser.hover("#cells span:nth-child(40)")
    assert browser.evaluate("getComputedStyle(document.getElementById('tip')).display") == "block"
    assert browser.errors() == []


def test_the_browser_check_catches_errors(browser: Browser, tmp_path: Path) -> None:
    at_load, on_hover = tmp_path / "at_load.html", tmp_path / "on_hover.html"
    at_load.write_text("<!doctype html><p>x</p><script>undefinedFunction();</script>")
    on_hover.write_text("<!doctype html><p id=p>hover me</p><script>document.getElementById('p')"
                        ".addEventListener('mouseover', () => null.x);</script>")
    browser.open(at_load)
    assert any("undefinedFunction" in e for e in browser.errors())
    browser.events.clear()
    browser.open(on_hover)
    assert browser.errors() == []
    browser.hover("#p")
    assert any("null" in e for e in browser.errors())
