"""`rnngen export`: onnxruntime reproduces PyTorch's numbers, the example sampler rnngen's text, and what
cannot be exported is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import pattern_text, run_cli

pytest.importorskip("onnxruntime", reason="the export tests need rnngen[export]")
import onnxruntime as ort  # noqa: E402

import rnngen  # noqa: E402
from rnngen.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from rnngen.config import ModelConfig  # noqa: E402
from rnngen.errors import InputError, RnngenError  # noqa: E402
from rnngen.export import export_onnx  # noqa: E402
from rnngen.model import ClassifierHead, RNNModel  # noqa: E402
from rnngen.tokenizers import CharTokenizer  # noqa: E402

SAMPLER = Path(__file__).resolve().parents[1] / "examples" / "onnx_sample.py"
CLASSIFY = SAMPLER.with_name("onnx_classify.py")
# Enough training on the a^n b^n pattern for greedy decoding to write varied text, not one character.
SMALL = dict(hidden=24, emb_dim=16, layers=2, batch_size=16, seq_len=32, lr=1e-2, dropout=0.0, warmup_steps=5,
             max_steps=40, eval_every=40)
# A vote to fold in; the recurrent part alone, and with a bag of n-grams (characters and subwords).
CLASSIFIER = dict(hidden=24, emb_dim=16, layers=1, batch_size=16, max_epochs=2, lm_vote=0.5, ngrams=0)
CLASSIFIERS = {"classifier": CLASSIFIER, "bag-char": {**CLASSIFIER, "ngrams": 3},
               "bag-bpe": {**CLASSIFIER, "ngrams": 2, "tokenizer": "bpe", "vocab_size": 300}}
KINDS = [(arch, tok) for arch in ("lstm", "gru", "rnn") for tok in ("char", "bpe")]
STEPS = 1000
# Tiny models run fastest on one thread, and two threads on a shared 2-core machine can be 10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# The runs are trained with rnngen's Python API in one fresh process (one start of torch for all seven).
TRAIN_ALL = """
import json, sys
import rnngen
import rnngen.classify  # the API's functions stay functions whatever is imported (a module once hid rnngen.train)
train, train_classifier = rnngen.train, rnngen.train_classifier
jobs = json.loads(sys.argv[1])
for out, options in jobs["lm"]:
    train([jobs["corpus"]], out=out, **options)
for out, options in jobs["classifiers"]:
    train_classifier([jobs["labelled"]], out=out, **options)
"""


def example_sampler() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onnx_sample", SAMPLER)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with corpus.txt, a small trained run per cell and tokenizer (ARCH-TOK/run) and classifier runs
    with label tokens (NAME/run for each of CLASSIFIERS) trained on three classes of letter strings."""
    root = tmp_path_factory.mktemp("export")
    (root / "corpus.txt").write_text(pattern_text(100), encoding="utf-8")
    labelled = root / "labelled"
    labelled.mkdir()
    rng = np.random.default_rng(0)
    for name, letters in {"low": "abcdefg", "mid": "hijklmn", "high": "opqrstu"}.items():
        words = ["".join(rng.choice(list(letters), size=rng.integers(3, 9))) for _ in range(60)]
        (labelled / f"{name}.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    jobs = {"corpus": str(root / "corpus.txt"), "labelled": str(labelled),
            "classifiers": [(str(root / name / "run"), options) for name, options in CLASSIFIERS.items()],
            "lm": [(str(root / f"{arch}-{tok}" / "run"),
                    {**SMALL, "arch": arch, "tokenizer": tok, **({"vocab_size": 270} if tok == "bpe" else {})})
                   for arch, tok in KINDS]}
    proc = subprocess.run([sys.executable, "-c", TRAIN_ALL, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module", params=KINDS, ids=[f"{a}-{t}" for a, t in KINDS])
def exported(request: pytest.FixtureRequest, runs: Path) -> tuple[Path, Path]:
    """A trained run of each cell and tokenizer, and its export (the library call the command makes)."""
    root = runs / "-".join(request.param)
    export_onnx(root / "run", root / "onnx")
    return root / "run", root / "onnx"


def test_logits_match_pytorch_over_1000_steps(exported: tuple[Path, Path], runs: Path) -> None:
    run, folder = exported
    model, tokenizer, _, _ = load_checkpoint(run)
    tokens = np.resize(tokenizer.encode((runs / "corpus.txt").read_text(encoding="utf-8")), (1, STEPS)).astype(np.int64)
    assert tokens.shape == (1, STEPS)
    with torch.no_grad():
        expected, expected_state = model(torch.from_numpy(tokens))
    lm = example_sampler().OnnxLM(folder)
    window, window_state = lm.run(tokens, lm.initial_state())  # one long window
    state, stepped = lm.initial_state(), []
    for t in range(STEPS):  # one token at a time, the state carried
        logits, state = lm.run(tokens[:, t:t + 1], state)
        stepped.append(logits[:, 0])
    np.testing.assert_allclose(window[0], expected[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack(stepped, 1)[0], expected[0].numpy(), atol=1e-4, rtol=0)
    for got in (window_state, state):
        assert len(got) == len(expected_state) == (2 if model.config.arch == "lstm" else 1)
        for g, e in zip(got, expected_state):  # an LSTM's cell state grows to hundreds here: float32 noise is relative
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-5)


def test_greedy_text_matches_rnngen(exported: tuple[Path, Path]) -> None:
    run, folder = exported
    sampler = example_sampler()
    ours = "".join(sampler.generate(sampler.OnnxLM(folder), "", length=300, greedy=True))
    assert ours == rnngen.load(str(run)).sample("", length=300, greedy=True)
    assert len(set(ours)) > 1  # a text, not the same character 300 times


def test_command_and_example_script_end_to_end(runs: Path, tmp_path: Path) -> None:
    """The installed command exports; the script, run as a user runs it, prints what `rnngen sample` prints."""
    run, folder = runs / "lstm-char" / "run", tmp_path / "onnx"
    proc = run_cli("export", str(run), "-o", str(folder), "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["files"] == ["README.md", "config.json", "model.onnx", "tokenizer.json"]
    assert max(result["max_difference"].values()) < 1e-4
    contract = (folder / "README.md").read_text(encoding="utf-8")
    assert "`tokens` | int64 [batch, time]" in contract and "`c_out`" in contract

    prompt = "ab \\na"
    expected = run_cli("sample", str(run), "--greedy", "-n", "300", "--seed", "0", "--prompt", prompt, env=ONE_THREAD)
    assert expected.returncode == 0, expected.stderr
    # Run as a script, and fail if anything imports torch (onnxruntime and numpy only).
    argv = [str(SAMPLER), str(folder), "--greedy", "-n", "300", "--prompt", prompt]
    script = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(SAMPLER)!r}, run_name='__main__'); "
              "assert 'torch' not in sys.modules, 'torch imported'")
    ours = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == expected.stdout
    assert ours.stdout.startswith("ab \na") and ours.stdout.endswith("\n")

    sampled = subprocess.run([sys.executable, str(SAMPLER), str(folder), "-n", "50", "--top-k", "5", "--top-p", "0.9",
                              "-t", "0.7", "--seed", "3"], capture_output=True, text=True, timeout=120)
    again = subprocess.run(sampled.args, capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0 and sampled.stdout == again.stdout and len(sampled.stdout) == 51

    (folder / "model.onnx").write_bytes(b"stale")  # a non-empty folder is refused; force replaces it whole
    with pytest.raises(InputError, match="--force"):
        export_onnx(run, folder)
    export_onnx(run, folder, force=True)
    assert sorted(p.name for p in folder.iterdir()) == result["files"]
    assert (folder / "model.onnx").stat().st_size > 1000


def test_sampler_filters_as_rnngen_does() -> None:
    from rnngen.generate import filter_logits

    sampler = example_sampler()
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    for top_k, top_p in [(5, None), (None, 0.5), (10, 0.8), (None, 1e-6), (50, 1.0)]:
        expected = filter_logits(torch.from_numpy(logits)[None], top_k, top_p)[0].numpy()
        np.testing.assert_array_equal(np.isinf(sampler.filter_logits(logits, top_k, top_p)), np.isinf(expected))
    rng = np.random.default_rng(1)
    draws = [sampler.pick(logits, 1.0, 3, None, False, rng) for _ in range(300)]
    assert set(draws) == set(np.argsort(-logits)[:3].tolist())


def example_classifier() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onnx_classify", CLASSIFY)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


TEXTS = ["abcab", "hijkl", "rstuo", "agh", "x", "opqabc" * 3, "", "ABC hij"]


def assert_matches_classify_predict(run: Path, folder: Path) -> np.ndarray:
    """The example script's probabilities (head alone, and with the vote) are `rnngen classify predict`'s;
    returns the head's."""
    classifier = example_classifier().OnnxClassifier(folder)
    classes = classifier.spec["classes"]
    head = classifier.probabilities(TEXTS, vote=False)
    for vote, probs in ((["--lm-vote", "0"], head), ([], classifier.probabilities(TEXTS))):
        proc = run_cli("classify", "predict", str(run), *TEXTS, "--json", "--top", "3", *vote, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr
        for row, p in zip(map(json.loads, proc.stdout.splitlines()), probs):
            assert row["label"] == classes[int(p.argmax())]
            for entry in row["top"]:
                assert abs(entry["probability"] - p[classes.index(entry["label"])]) < 1e-4
    assert np.abs(head - classifier.probabilities(TEXTS)).max() > 1e-3  # the vote changed something
    return head


def test_classifier_matches_classify_predict(runs: Path, tmp_path: Path) -> None:
    classifier_run = runs / "classifier" / "run"
    result = export_onnx(classifier_run, tmp_path / "onnx")
    assert result.files == ["README.md", "classifier.onnx", "config.json", "model.onnx", "tokenizer.json"]
    assert result.lm_vote == 0.5
    config = json.loads((tmp_path / "onnx" / "config.json").read_text(encoding="utf-8"))
    cls = config["classifier"]
    assert config["label_tokens"] == cls["classes"] == ["high", "low", "mid"]
    assert config["sampling"]["never_sample_from_id"] == config["model"]["vocab_size"] - 3
    assert cls["bag"] is None
    assert_matches_classify_predict(classifier_run, tmp_path / "onnx")

    # Its language model never generates a label token.
    sampler = example_sampler()
    text = "".join(sampler.generate(sampler.OnnxLM(tmp_path / "onnx"), "", length=200, greedy=True))
    assert text == rnngen.load(str(classifier_run)).sample("", length=200, greedy=True)


@pytest.mark.parametrize("name", ["bag-char", "bag-bpe"])
def test_bag_classifier_matches_classify_predict(name: str, runs: Path, tmp_path: Path) -> None:
    """A classifier with a bag of n-grams: the example computes the bags from config.json's description alone,
    and its classes are the command's; the bag counts (emptied, the answers change)."""
    run, folder = runs / name / "run", tmp_path / "onnx"
    proc = run_cli("export", str(run), "-o", str(folder), "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["max_difference"]["classifier.onnx"] < 1e-4
    bag = json.loads((folder / "config.json").read_text(encoding="utf-8"))["classifier"]["bag"]
    assert bag["ngrams"] == CLASSIFIERS[name]["ngrams"] and "bag_counts" in (folder / "README.md").read_text()
    assert bag["char_ngrams"] == (4 if name == "bag-bpe" else 0)  # subword bags also hold character n-grams
    head = assert_matches_classify_predict(run, folder)

    classifier = example_classifier().OnnxClassifier(folder)
    feeds = classifier.feeds(TEXTS)
    assert feeds["bag_ids"].shape[0] == len(TEXTS) and feeds["bag_counts"][TEXTS.index("")].sum() == 0
    feeds["bag_counts"][:] = 0
    without = classifier.session.run(["logits"], feeds)[0]
    assert np.abs(softmax(without) - head).max() > 1e-3

    # Run as a user runs it: onnxruntime and numpy only, the command's labels.
    script = (f"import runpy, sys; sys.argv = {[str(CLASSIFY), str(folder), *TEXTS[:4]]!r}; "
              f"runpy.run_path({str(CLASSIFY)!r}, run_name='__main__'); "
              "assert 'torch' not in sys.modules, 'torch imported'")
    ours = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    expected = run_cli("classify", "predict", str(run), *TEXTS[:4], "--json", env=ONE_THREAD)
    assert [line.split("\t")[0] for line in ours.stdout.splitlines()] == \
        [json.loads(line)["label"] for line in expected.stdout.splitlines()]


def one_line_refusal(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr


def test_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    tok = CharTokenizer(list("abc \n"))
    bidirectional = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=8, emb_dim=4, layers=1, bidirectional=True))
    save_checkpoint(tmp_path / "bi", bidirectional, tok, {})
    one_line_refusal(run_cli("export", str(tmp_path / "bi"), "-o", str(tmp_path / "out"), env=ONE_THREAD),
                     "bidirectional")
    assert not (tmp_path / "out").exists()

    save_checkpoint(tmp_path / "head", RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=8, emb_dim=4)), tok, {})
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    config["heads"] = {"ranker": {"type": "ranker"}}
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RnngenError, match="ranker") as refused:
        export_onnx(tmp_path / "head", tmp_path / "out")
    assert "\n" not in str(refused.value)

    # Without onnx installed (an import hook makes `import onnx` fail): the message says what to install.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('onnx', 'onnxruntime'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    one_line_refusal(run_cli("export", str(tmp_path / "bi"), "-o", str(tmp_path / "out"), env=env),
                     "pip install 'rnngen[export]'")


@pytest.mark.parametrize("ngrams", [0, 2], ids=["recurrent", "with-bag"])
@pytest.mark.parametrize("chars", ["abc \n", "abc "], ids=["newline-start", "no-newline"])
def test_classifier_graph_folds_the_vote_as_classify_does(chars: str, ngrams: int, tmp_path: Path) -> None:
    """classifier.onnx's graph against rnngen.classify on random weights, with and without a start token, with
    and without a bag of n-grams (the graph's right-padded bags against the head's flat ones)."""
    from rnngen.classify import class_log_scores, encode_texts, start_ids
    from rnngen.export import ClassifierGraph, export_classifier

    torch.manual_seed(0)
    tok = CharTokenizer(list(chars))
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size + 2, hidden=8, emb_dim=4, layers=2, dropout=0.0,
                                 label_tokens=("x", "y"))).eval()
    head = ClassifierHead(model.encoder.output_size, ["x", "y"], ngrams=ngrams)
    model.heads["classifier"] = head
    model.eval()
    texts = ["abcab", "c", "", "ba cab", "cab" * 9]
    read = encode_texts(tok, texts, 4, ngrams)
    bag_inputs: tuple[torch.Tensor, ...] = ()
    if ngrams:
        with torch.no_grad():
            head.bag.weight.normal_()
        head.set_idf([ids for ids, _ in read.bags or []])
        head.bag_share.fill_(0.625)
        width = max(len(ids) for ids, _ in read.bags or [])
        ids, counts = torch.zeros(len(texts), width, dtype=torch.long), torch.zeros(len(texts), width)
        for i, (b, c) in enumerate(read.bags or []):
            ids[i, : len(b)], counts[i, : len(c)] = torch.from_numpy(b), torch.from_numpy(c)
        bag_inputs = (ids, counts)
    prior = [-0.3, -1.35]
    seqs = read.seqs
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = torch.from_numpy(seq)
    lengths = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        logits, scores = ClassifierGraph(model, 0.75, prior, start_ids(tok)).eval()(tokens, lengths, *bag_inputs)
    expected = class_log_scores(model, tok, read, torch.device("cpu"), 0.75, prior)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.log_softmax(logits, -1),
                               class_log_scores(model, tok, read, torch.device("cpu")), atol=1e-5, rtol=0)
    assert export_classifier(model, tok, 0.75, prior, tmp_path / "classifier.onnx") < 1e-4  # onnxruntime agrees
