"""Export a checkpoint for other runtimes: ONNX graphs plus the JSON a program in any language needs.

    DIR/
      model.onnx        the step model: tokens (B, T) and the state in, logits (B, T, V) and the state out
      classifier.onnx   classifier checkpoints only: tokens (B, T) and lengths (B,) in (and each text's bag of
                        n-grams, where the head reads one), class logits out
      config.json       the model's shape, the state's names, label tokens, how to start, how to classify
      tokenizer.json    how to encode and decode (a char table, or sentencepiece's pieces)
      tokenizer.model   subword checkpoints only: the sentencepiece model
      README.md         the input and output contract, in prose

The graphs come from PyTorch's TorchScript exporter (``dynamo=False``), at its highest opset (20). In
torch 2.13 the dynamo exporter (the default, and it needs onnxscript) fixes the time axis of recurrent
layers to the example's length: a plain RNN's graph rejects any other length, a GRU's and LSTM's
declare the example's length on their outputs (onnxruntime warns at every call). The TorchScript
exporter writes ONNX's own LSTM/GRU/RNN operators with batch and time dynamic, and takes a tenth of
the time. Every export is checked: onnxruntime must give PyTorch's numbers before the folder is written.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, write_dir_atomically
from .classify import can_vote, max_len_of, start_ids
from .errors import CheckpointError, InputError, RnngenError
from .model import BAG_BUCKETS, BAG_CHAR_SEED, BAG_MULTIPLIER, BAG_SEED, BAG_SHIFT, ClassifierHead, RNNModel
from .tokenizers import REPLACEMENT, CharTokenizer, SentencePieceTokenizer, Tokenizer
from .version import __version__

FORMAT = "rnngen-onnx"
FORMAT_VERSION = 1
OPSET = 20  # the TorchScript exporter's highest (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
FORMATS = ("onnx",)
CHECK_TOLERANCE = 1e-3  # largest difference the post-export check accepts (float32 noise is ~1e-6)
INSTALL_HINT = "rnngen export needs onnx and onnxruntime: pip install 'rnngen[export]'"


@dataclass
class ExportResult:
    """What was written, and how far onnxruntime's numbers were from PyTorch's in the check."""

    directory: Path
    files: list[str]
    max_difference: dict[str, float] = field(default_factory=dict)
    lm_vote: float | None = None  # the vote folded into classifier.onnx's `scores`; None without a classifier

    def to_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "files": self.files, "max_difference": self.max_difference,
                "lm_vote": self.lm_vote}


def require_onnx() -> None:
    """Raise a one-line InputError naming the extra to install when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError(INSTALL_HINT) from None


class StepGraph(nn.Module):
    """The language model as one call: tokens and the state in, logits and the new state out."""

    def __init__(self, model: RNNModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, out = self.model(tokens, tuple(state))
        return (logits, *out)


class ClassifierGraph(nn.Module):
    """The classification head on right-padded tokens, and the head with the language model's vote.

    Outputs ``logits`` (B, C), the head's, and ``scores`` (B, C): log_softmax(logits) + vote * (log p(text |
    label) + log p(label)), as ``rnngen.classify.class_log_scores`` computes them (just log_softmax(logits)
    when the vote is 0). The text's likelihood under each label is read as classify.py reads it: the
    classifier input with its start token replaced by the label's token, then the start token to end it.
    """

    log_prior: torch.Tensor  # (C,) buffers, empty without a vote
    label_ids: torch.Tensor

    def __init__(self, model: RNNModel, vote: float, log_prior: list[float], start: list[int]) -> None:
        super().__init__()
        self.model, self.vote, self.start = model, vote, start
        self.register_buffer("log_prior", torch.tensor(log_prior if vote > 0 else [], dtype=torch.float32))
        labels = [model.config.label_id(c) for c in model.classifier.classes] if vote > 0 else []  # type: ignore
        self.register_buffer("label_ids", torch.tensor(labels, dtype=torch.long))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, bag_ids: torch.Tensor | None = None,
                bag_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        encoder, head = self.model.encoder, self.model.classifier
        assert head is not None
        hidden, _ = encoder.rnn(encoder.embedding(tokens))  # (B, T, H); unidirectional: padding comes after
        # Each text's last state, by gather (Encoder.forward_padded indexes with arange(len(lengths)), which
        # the tracer would freeze to the example's batch size).
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden.size(2))
        last = hidden.gather(1, index).squeeze(1)
        recurrent, _ = head.parts(hidden, last, lengths)
        bag = None if bag_ids is None or bag_counts is None else head.padded_bag_logits(bag_ids, bag_counts)
        logits = head.mix(recurrent, bag)
        scores = torch.log_softmax(logits, dim=-1)
        if self.vote > 0:
            scores = scores + self.vote * (self._label_log_likelihoods(tokens, lengths) + self.log_prior)
        return logits, scores

    def _label_log_likelihoods(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log p(text | label) (B, C): see classify.label_log_likelihoods."""
        batch, time = tokens.size(0), tokens.size(1)
        classes = self.label_ids.size(0)
        positions = torch.arange(time).unsqueeze(0)  # (1, T)
        if self.start:  # input "\n" t1..tn -> LM input <label> t1..tn, targets t1..tn "\n"
            body = tokens[:, 1:]
            targets = torch.cat([body, torch.zeros_like(tokens[:, :1])], dim=1)
            targets = torch.where(positions == (lengths - 1).unsqueeze(1), self.start[0], targets)
        else:  # no start token: LM input <label> t1..tn-1, targets t1..tn
            body, targets = tokens[:, :-1], tokens
        label_column = self.label_ids.view(1, -1, 1).expand(batch, classes, 1)
        inputs = torch.cat([label_column, body.unsqueeze(1).expand(batch, classes, time - 1)], dim=2)
        logits, _ = self.model(inputs.reshape(batch * classes, time))
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(batch, classes, time, -1)
        picked = log_probs.gather(3, targets.view(batch, 1, time, 1).expand(batch, classes, time, 1)).squeeze(3)
        valid = (positions < lengths.unsqueeze(1)).unsqueeze(1)  # (B, 1, T)
        return torch.where(valid, picked, torch.zeros_like(picked)).sum(2)


def _state_names(model: RNNModel) -> list[str]:
    return ["h", "c"] if model.config.arch == "lstm" else ["h"]


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        # The exporter's deprecation notice and its advice to pass the initial state as an input (done).
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def _max_difference(path: Path, feeds: dict[str, np.ndarray], expected: tuple[torch.Tensor, ...]) -> float:
    """Largest absolute difference between onnxruntime's outputs and ``expected``; raises if above tolerance."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a few small inputs: more threads only wait for each other
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    diff = max(float(np.abs(g - e.detach().numpy()).max()) for g, e in zip(got, expected))
    if not diff <= CHECK_TOLERANCE:
        raise RnngenError(f"the exported {path.name} does not match the checkpoint (largest difference {diff:.3g}); "
                          "please report it with the output of `rnngen info`")
    return diff


def export_step(model: RNNModel, path: Path) -> float:
    """Write the step model to ``path``; the largest difference from PyTorch on a random input."""
    names = _state_names(model)
    c = model.config
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.text_vocab_size, (2, 7), generator=gen)
    state = tuple(torch.randn(c.layers, 2, c.hidden, generator=gen) * 0.5 for _ in names)
    axes: dict[str, dict[int, str]] = {"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    for name in names:
        axes[name] = axes[f"{name}_out"] = {1: "batch"}
    graph = StepGraph(model).eval()
    _export(graph, (tokens, *state), path, ["tokens", *names], ["logits", *(f"{n}_out" for n in names)], axes)
    with torch.no_grad():  # checked at another batch size and length than the example's
        tokens, state = tokens[:1].repeat(3, 2), tuple(s[:, :1].repeat(1, 3, 1) for s in state)
        expected = graph(tokens, *state)
    return _max_difference(path, {"tokens": tokens.numpy(), **{n: s.numpy() for n, s in zip(names, state)}},
                           expected)


def export_classifier(model: RNNModel, tokenizer: Tokenizer, vote: float, log_prior: list[float],
                      path: Path) -> float:
    """Write classifier.onnx; the largest difference from PyTorch on random texts of several lengths."""
    start = start_ids(tokenizer)
    graph = ClassifierGraph(model, vote, log_prior, start).eval()
    gen = torch.Generator().manual_seed(0)

    bagged = bool(model.classifier and model.classifier.ngrams)
    inputs = ["tokens", "lengths", *(["bag_ids", "bag_counts"] if bagged else [])]

    def example(lengths: list[int]) -> tuple[torch.Tensor, ...]:
        tokens = torch.randint(1, model.config.text_vocab_size, (len(lengths), max(lengths)), generator=gen)
        tokens[:, :len(start)] = torch.tensor(start, dtype=torch.long)
        for i, n in enumerate(lengths):
            tokens[i, n:] = 0
        if not bagged:
            return tokens, torch.tensor(lengths, dtype=torch.long)
        grams = 3 * max(lengths)  # bags of several sizes, right-padded with count 0 (the last text's empty)
        ids = torch.randint(0, BAG_BUCKETS, (len(lengths), grams), generator=gen)
        counts = torch.randint(1, 4, (len(lengths), grams), generator=gen).float()
        for i, n in enumerate(lengths):
            counts[i, 3 * n if i < len(lengths) - 1 else 0:] = 0
        return tokens, torch.tensor(lengths, dtype=torch.long), ids, counts

    axes = {"tokens": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "logits": {0: "batch"}, "scores": {0: "batch"},
            **({"bag_ids": {0: "batch", 1: "grams"}, "bag_counts": {0: "batch", 1: "grams"}} if bagged else {})}
    _export(graph, example([5, 3]), path, inputs, ["logits", "scores"], axes)
    feeds = example([4, 9, 2])
    with torch.no_grad():
        expected = graph(*feeds)
    return _max_difference(path, {name: t.numpy() for name, t in zip(inputs, feeds)}, expected)


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer.json: enough to encode characters and to decode any id without rnngen."""
    if isinstance(tokenizer, CharTokenizer):
        return {"type": "char", "unk_id": 0, "vocab": tokenizer.itos,
                "encode": "each character (Unicode code point) is the id of its entry in vocab, searched from "
                          "id 1; a character not in vocab is unk_id",
                "decode": "concatenate vocab[id]; unk_id decodes to U+FFFD"}
    if isinstance(tokenizer, SentencePieceTokenizer):
        pieces = []
        for i, piece in enumerate(tokenizer.pieces):
            if tokenizer.is_byte[i]:
                pieces.append({"kind": "byte", "byte": int(piece[3:5], 16)})
            elif tokenizer.is_control[i]:
                pieces.append({"kind": "control", "text": ""})
            elif i == tokenizer.unk_id:
                pieces.append({"kind": "unk", "text": REPLACEMENT})
            else:
                pieces.append({"kind": "text", "text": piece.replace("\u2581", " ")})
        return {"type": tokenizer.kind, "model_file": "tokenizer.model", "unk_id": tokenizer.unk_id,
                "newline_id": int(tokenizer.sp.piece_to_id("\n")), "pieces": pieces,
                "encode": "split the text at each \\n, encode each line with the sentencepiece model in "
                          "model_file (no options), and join the lines' ids with newline_id between them",
                "decode": "concatenate the pieces' text; runs of byte pieces are UTF-8 bytes, decoded with "
                          "invalid sequences replaced by U+FFFD; control pieces are empty"}
    raise CheckpointError(f"rnngen export does not know the tokenizer {tokenizer.kind!r}; upgrade rnngen")


def bag_json(head: ClassifierHead) -> dict[str, Any]:
    """config.json's `classifier.bag`: how to compute a text's bag of n-grams (model.bag_of_ngrams)."""
    return {"ngrams": head.ngrams, "char_ngrams": head.char_ngrams, "buckets": BAG_BUCKETS, "seed": BAG_SEED,
            "char_seed": BAG_CHAR_SEED, "multiplier": BAG_MULTIPLIER, "shift": BAG_SHIFT,
            "how": "lower-case the whole text (Unicode lower case) and encode it with the tokenizer; for each n "
                   "from 1 to ngrams and each run of n ids t1..tn: h = n * seed, then h = h * multiplier + t for "
                   "each t, in 64-bit two's-complement arithmetic (wrapping around); likewise for each n from 1 to "
                   "char_ngrams and each run of n characters of the lower-cased text (Unicode code points), from "
                   "h = n * char_seed; then for every n-gram h = h XOR (h >> shift), an arithmetic shift, and its "
                   "bucket is h mod buckets (0 to buckets - 1). bag_ids are a text's distinct buckets, bag_counts "
                   "how many of its n-grams fell in each"}


def no_prompt_ids(tokenizer: Tokenizer) -> list[int]:
    """Where generation without a prompt starts: the encoding of a newline (as Sampler._prompt_ids)."""
    newline = [int(i) for i in tokenizer.encode("\n")]
    return newline if newline and newline[0] != tokenizer.unk_id else [tokenizer.vocab_size - 1]


def _check_exportable(model: RNNModel, tokenizer: Tokenizer, fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    if model.config.bidirectional:
        raise InputError("this checkpoint has a bidirectional encoder, which cannot generate, so it has no step "
                         "model to export; export a unidirectional model")
    unknown = [name for name in model.heads if name != "classifier"]
    if unknown:
        raise InputError(f"rnngen export does not know the head {unknown[0]!r} of this checkpoint; it exports "
                         "language models and classifiers")
    if not isinstance(tokenizer, (CharTokenizer, SentencePieceTokenizer)):
        raise InputError(f"rnngen export does not know the tokenizer {tokenizer.kind!r}")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; pass a folder to write into with -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out} is not empty; pass another folder with -o, or --force to replace it")


def export_onnx(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", force: bool = False) -> ExportResult:
    """Export ``checkpoint`` into the folder ``out`` (see the module docstring); ``force`` replaces a non-empty
    folder. The folder is written whole into a temporary sibling and renamed into place."""
    require_onnx()
    out = Path(out)
    _prepare_out(out, force)
    model, tokenizer, ckpt, _ = load_checkpoint(checkpoint, "cpu")
    _check_exportable(model, tokenizer, fmt)
    model = model.float().eval()
    c = model.config
    names = _state_names(model)
    config: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "rnngen_version": __version__,
        "model": {"arch": c.arch, "layers": c.layers, "hidden": c.hidden, "emb_dim": c.emb_dim,
                  "vocab_size": c.vocab_size, "text_vocab_size": c.text_vocab_size},
        "onnx": {"file": "model.onnx", "opset": OPSET, "inputs": ["tokens", *names],
                 "outputs": ["logits", *(f"{n}_out" for n in names)], "state": names,
                 "state_shape": [c.layers, "batch", c.hidden]},
        "tokenizer": {"type": tokenizer.kind, "file": "tokenizer.json", "unk_id": int(tokenizer.unk_id),
                      **({"model_file": "tokenizer.model"} if tokenizer.kind != "char" else {})},
        "label_tokens": list(c.label_tokens),
        "label_ids": {label: c.label_id(label) for label in c.label_tokens},
        "sampling": {"never_sample_from_id": c.text_vocab_size, "no_prompt_ids": no_prompt_ids(tokenizer),
                     "no_prompt_text": "\n"},
    }
    vote: float | None = None
    if model.classifier is not None:
        saved = ckpt.get("classify", {})
        voting = "log_prior" in saved and can_vote(model) and float(saved.get("lm_vote", 0.0)) > 0
        vote = float(saved["lm_vote"]) if voting else 0.0
        config["classifier"] = {
            "file": "classifier.onnx", "classes": list(model.classifier.classes), "max_len": max_len_of(ckpt),
            "start_ids": start_ids(tokenizer), "lm_vote": vote,
            "log_prior": saved.get("log_prior") if voting else None,
            "class_label_ids": [c.label_id(k) for k in model.classifier.classes] if voting else None,
            "bag": bag_json(model.classifier) if model.classifier.ngrams else None}
    result = ExportResult(out, [], lm_vote=vote)

    def write(tmp: Path) -> None:
        result.max_difference["model.onnx"] = export_step(model, tmp / "model.onnx")
        if model.classifier is not None:
            cls = config["classifier"]
            result.max_difference["classifier.onnx"] = export_classifier(
                model, tokenizer, cls["lm_vote"], cls["log_prior"] or [], tmp / "classifier.onnx")
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False, indent=1)
                                            + "\n", encoding="utf-8")
        if isinstance(tokenizer, SentencePieceTokenizer):
            (tmp / "tokenizer.model").write_bytes(tokenizer.model_proto)
        (tmp / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(folder_readme(config), encoding="utf-8")
        result.files = sorted(p.name for p in tmp.iterdir())

    write_dir_atomically(out, write)
    return result


def folder_readme(config: dict[str, Any]) -> str:
    """README.md of an exported folder: the contract of its files, with this model's numbers."""
    m, o, s = config["model"], config["onnx"], config["sampling"]
    state = ", ".join(f"`{n}`" for n in o["state"])
    state_out = ", ".join(f"`{n}_out`" for n in o["state"])
    shape = f"float32 [{m['layers']}, batch, {m['hidden']}]"
    lines = [
        f"# rnngen export: {m['arch']} {m['layers']}x{m['hidden']}, vocabulary {m['vocab_size']}", "",
        f"Written by rnngen {config['rnngen_version']} (`rnngen export`). ONNX opset {o['opset']}; "
        "any runtime that runs ONNX's LSTM/GRU/RNN operators runs it.", "",
        "## model.onnx: one call reads tokens and carries the recurrent state", "",
        "| | name | type and shape |", "|---|---|---|",
        "| input | `tokens` | int64 [batch, time] |",
        *(f"| input | `{n}` | {shape} |" for n in o["state"]),
        f"| output | `logits` | float32 [batch, time, {m['vocab_size']}]: next-token logits after each position |",
        *(f"| output | `{n}_out` | {shape}: the state after the last position |" for n in o["state"]), "",
        f"Batch and time are dynamic. Start from zeros for {state}; feed {state_out} back as {state} on the next "
        "call. A long text can be read in one call or in pieces with the state carried: the logits agree to float "
        "precision.",
        "", "## Generating as `rnngen sample` does", "",
        f"1. With no prompt, start by reading ids {s['no_prompt_ids']} (the encoding of a newline); with a prompt, "
        "read the prompt's ids.",
        f"2. Take the logits of the last position. Set those of ids {s['never_sample_from_id']} and above "
        "(`sampling.never_sample_from_id` in config.json; label tokens, where the model has any) to -inf: they "
        "are never generated.",
        "3. Greedy: the largest logit. Otherwise divide by the temperature, keep the top-k logits, then the "
        "smallest set of most likely tokens whose probability reaches top-p (the most likely always kept), and "
        "draw from the softmax of what is left.",
        "4. Feed the drawn id (tokens of shape [1, 1]) with the state; repeat.", "",
        "## Tokenizer", "",
        "`tokenizer.json` says how to encode and decode (its `encode` and `decode` fields). Character models "
        "map each character to an id; subword models encode with sentencepiece (`tokenizer.model`) and decode "
        "from the `pieces` table.", "",
        "`examples/onnx_sample.py` in rnngen's repository does all this with onnxruntime and numpy alone.", "",
    ]
    if "classifier" in config:
        k = config["classifier"]
        lines += [
            "## classifier.onnx", "",
            "| | name | type and shape |", "|---|---|---|",
            "| input | `tokens` | int64 [batch, time]: each text's ids, right-padded with 0 |",
            "| input | `lengths` | int64 [batch]: each text's length in ids (padding excluded) |",
            *(["| input | `bag_ids` | int64 [batch, grams]: each text's bag of n-grams, right-padded with 0 |",
               "| input | `bag_counts` | float32 [batch, grams]: how often each of `bag_ids` occurs; 0 for padding |"]
              if k.get("bag") else []),
            f"| output | `logits` | float32 [batch, {len(k['classes'])}]: the classification head's logits |",
            f"| output | `scores` | float32 [batch, {len(k['classes'])}]: log-scores with the language model's vote |",
            "",
            f"A text's ids are `classifier.start_ids` ({k['start_ids']}) then the first {k['max_len']} ids of the "
            "text (`classifier.max_len`); an empty text is the start ids then the unknown id. Classes, in the "
            "order of the outputs, are `classifier.classes` in config.json.", "",
            *([f"The head also reads each whole text's bag of 1- to {k['bag']['ngrams']}-grams of ids"
               + (f" and 1- to {k['bag']['char_ngrams']}-grams of characters" if k['bag']['char_ngrams'] else "")
               + f" (hashed into {k['bag']['buckets']:,} buckets), as `classifier.bag` in config.json says: "
               f"{k['bag']['how']}.", ""]
              if k.get("bag") else []),
            "softmax(`logits`) gives the probabilities of `rnngen classify predict --lm-vote 0`; softmax(`scores`) "
            f"those of `rnngen classify predict` with the checkpoint's vote (weight {k['lm_vote']:g}): "
            "log_softmax(logits) + weight * (log p(text | label) + log_prior), where log p(text | label) is "
            "model.onnx's log-likelihood of the text's ids read after the label's token (`class_label_ids`) "
            "instead of the start ids, ending with the start ids. With weight 0 the two agree.", "",
            "`examples/onnx_classify.py` in rnngen's repository does all this with onnxruntime and numpy alone.", "",
        ]
    return "\n".join(lines)
