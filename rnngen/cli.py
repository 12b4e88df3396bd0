"""The `rnngen` command: a thin click layer over the library. torch is imported only by commands that use it."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__

LONG_PROMPT_CHARS = 100_000  # `rnngen sample` shows a bar while it reads a longer prompt (seconds on a CPU)
SAMPLE_LENGTH = 200  # tokens shown at each evaluation of `rnngen train` when a person is watching

EXAMPLES = {
    "train": "rnngen train                       # the built-in corpus (Python's help pages)\n"
             "rnngen train corpus.txt --out checkpoints/mine --max-time 600\n"
             "rnngen train tinyshakespeare --hidden 512 --layers 3     # fetched once, then cached\n"
             "rnngen train book.txt --tokenizer bpe --vocab-size 2000\n"
             "rnngen train lyrics.txt --from checkpoints/big --max-steps 500   # fine-tune a trained model\n"
             "rnngen train --resume --out checkpoints/mine             # continue exactly where it stopped",
    "sample": "rnngen sample checkpoints/mine --prompt 'ROMEO:' --length 300\n"
              "rnngen sample checkpoints/mine -t 0.5 -t 1.0 --seed 7   # one sample per temperature\n"
              "rnngen sample checkpoints/mine --top-p 0.9 --stop '\\n\\n' > out.txt\n"
              "rnngen sample checkpoints/mine --num-samples 16 --length 200 --json   # 16 at once\n"
              "rnngen sample checkpoints/mine --prompt-file chapter1.txt -n 2000   # prime with a whole file",
}


def _check_positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise click.BadParameter(f"must be a positive number, got {v}")
    return value


def _check_top_p(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


class RnngenGroup(click.Group):
    """Turns every error into one line on stderr and an exit status (no traceback unless --debug)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        debug = "--debug" in sys.argv[1:] or os.environ.get("RNNGEN_DEBUG") == "1"
        try:
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _error("aborted")
            sys.exit(130)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
            _error(f"{exc.format_message()}{hint}")
            _exit_after_error(2)
        except KeyboardInterrupt:
            _error("interrupted")
            sys.exit(130)
        except BrokenPipeError:
            sys.stderr.close()  # e.g. `rnngen sample ... | head`: nothing more to say
            sys.exit(0)
        except Exception as exc:
            from .errors import RnngenError

            if debug:
                raise
            if isinstance(exc, RnngenError):
                _error(str(exc))
                _exit_after_error(exc.exit_code)
            if isinstance(exc, MemoryError):
                _error("out of memory; use a smaller --batch-size, --hidden or --seq-len")
                sys.exit(1)
            _error(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(rerun with --debug for the traceback, and please report it)", every_rank=True)
            sys.exit(1)


def _rank() -> int:
    """This process's rank under torchrun, else 0 (read here: distributed.py would import torch)."""
    torchrun = all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    return int(os.environ["RANK"]) if torchrun else 0


def _error(message: str, every_rank: bool = False) -> None:
    from .console import error

    # Under torchrun every process gets here. Errors are agreed between the ranks (distributed.py),
    # so rank 0 reports them; one that a single rank ran into is also reported by that rank.
    if _rank() == 0:
        error(message)
    elif every_rank:
        error(f"rank {_rank()}: {message}")


def _exit_after_error(code: int) -> NoReturn:
    # Under torchrun, rank 0 reports an (agreed) error and gives torchrun the exit status. The other
    # ranks leave with 0: a rank that fails makes torchrun kill the others at once, rank 0 perhaps
    # before it has said what went wrong.
    sys.exit(code if _rank() == 0 else 0)


@click.group(cls=RnngenGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rnngen")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """Train recurrent language models on your own text, then generate from them."""


def model_options(command: Any) -> Any:
    """The options that shape a new model and its tokenizer (shared by `train` and `classify train`)."""
    for option in reversed([
        click.option("--arch", type=click.Choice(["lstm", "gru", "rnn"]), help="Recurrent cell [default: lstm]."),
        click.option("--layers", type=int, help="Recurrent layers [default: 2]."),
        click.option("--hidden", type=int, help="Hidden units per layer [default: 256]."),
        click.option("--emb-dim", type=int, help="Embedding size [default: 64]."),
        click.option("--dropout", type=float, help="Dropout between layers and before the output [default: 0.1]."),
        click.option("--emb-dropout", type=float, help="Dropout on embeddings [default: 0]."),
        click.option("--weight-drop", type=float,
                     help="Dropout on the hidden-to-hidden weights while training (DropConnect) [default: 0]."),
        click.option("--tie-weights", is_flag=True, default=None, help="Share embedding and output matrices."),
        click.option("--tokenizer", type=click.Choice(["char", "bpe", "unigram"]), help="[default: char]"),
        click.option("--vocab-size", type=int, help="Subword vocabulary size for bpe/unigram [default: 2000]."),
        click.option("--min-char-count", type=int,
                     help="Fold characters seen fewer times into <unk> [default: 1]."),
    ]):
        command = option(command)
    return command


def optimizer_options(command: Any) -> Any:
    """The optimiser's options that `train` and `classify train` share (same names, same defaults)."""
    for option in reversed([
        click.option("--warmup-steps", type=int, help="Linear warm-up steps [default: 50]."),
        click.option("--weight-decay", type=float, help="AdamW weight decay [default: 0.01]."),
        click.option("--grad-clip", type=float, help="Gradient norm clip [default: 1.0]."),
        click.option("--ema", type=float, help="Evaluate and keep a moving average of the weights with this "
                                               "decay, e.g. 0.999 (0 = off) [default: 0]."),
    ]):
        command = option(command)
    return command


# ---------------------------------------------------------------------------------------------- train
@main.command(epilog="Examples:\n\n\b\n" + EXAMPLES["train"])
@click.argument("corpus", nargs=-1)
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory [default: checkpoints/NAME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--from", "base", type=click.Path(), metavar="CHECKPOINT",
              help="Fine-tune this trained model on CORPUS (its network and vocabulary; new characters are "
                   "added) instead of starting from scratch.")
@model_options
@click.option("--batch-size", "-b", type=int, help="Sequences per batch [default: 64].")
@click.option("--seq-len", type=int, help="Tokens per backpropagation window [default: 128].")
@click.option("--state-reset", type=float,
              help="Share of windows that start from a fresh state, not the carried one [default: 0.3].")
@click.option("--lr", type=float, help="Peak learning rate [default: 0.002].")
@click.option("--min-lr-ratio", type=float,
              help="Where the cosine decay ends, as a share of --lr [default: 0.05].")
@optimizer_options
@click.option("--max-steps", type=int, help="Stop after this many steps [default: 1000].")
@click.option("--max-time", type=float, help="Stop after this many seconds (the schedule fits it).")
@click.option("--eval-every", type=int, help="Evaluate and checkpoint every N steps [default: 200].")
@click.option("--eval-max-tokens", type=int, help="Cap on validation tokens per evaluation [default: all].")
@click.option("--patience", type=int, help="Stop after N evaluations without improvement [default: off].")
@click.option("--save-every", type=int, help="Also save the resume checkpoint every N steps.")
@click.option("--val-fraction", type=float, help="Share of the corpus (from the end) held out [default: 0.1].")
@click.option("--seed", type=int, help="Random seed [default: 1337].")
@click.option("--device", help="auto, cpu, cuda or mps [default: auto].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="Compute precision; auto = bf16 on CUDA and on CPUs with native bf16 [default: auto].")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the corpus files.")
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True,
              help="What to do with undecodable bytes.")
@click.option("--sample-length", type=click.IntRange(min=0),
              help="Show this many tokens sampled from the model at each evaluation (0: none) "
                   "[default: 200; 0 with --quiet or --json].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object on stdout.")
def train(corpus: tuple[str, ...], out: str | None, resume: bool, base: str | None, encoding: str, errors: str,
          quiet: bool, as_json: bool, **options: Any) -> None:
    """Train a language model on CORPUS (text files, folders of them, or a named data set: tinyshakespeare, names).

    With no CORPUS it trains on a built-in corpus: the help pages of this Python installation.
    Writes best/ and last/ checkpoints and metrics.jsonl into --out. Ctrl-C stops after saving;
    --resume continues where it stopped. --from starts from a trained model instead of from scratch.
    """
    import threading

    from . import console
    from .distributed import session
    from .train import prepare_run

    if resume and not out:
        raise click.UsageError("--resume needs --out DIR, the run to continue")
    out = out or _default_out(corpus)
    options = {k: v for k, v in options.items() if v is not None}
    stop = threading.Event()
    with session() as dist:  # several processes under torchrun: only rank 0 shows anything
        quiet = quiet or not dist.is_main
        if "sample_length" not in options:  # samples are for a person watching the progress bar
            options["sample_length"] = 0 if quiet or as_json else SAMPLE_LENGTH
        progress = console.TrainProgress(enabled=not (quiet or as_json))
        trainer = prepare_run(list(corpus), out, resume=resume, encoding=encoding, errors=errors,
                              callback=progress.update if dist.is_main else None, stop=stop, dist=dist, base=base,
                              **options)
        what = trainer.meta.get("training", {}).get("corpus", "")
        if base and not quiet:
            _note_fine_tune(trainer.meta["training"], base)
        processes = f" x {dist.world_size} processes" if dist.enabled else ""
        headline = (f"{'resuming at step ' + str(trainer.pos.step) if resume else 'training'} on {what}: "
                    f"{trainer.model.num_parameters():,} parameters, {len(trainer.split.tokens):,} tokens, "
                    f"device {trainer.device.type}{processes}, {'bf16' if trainer.bf16 else 'fp32'}, into {out}")
        result = _run_trainer(trainer, progress, stop, None if quiet or as_json else headline, dist)
    if not dist.is_main:
        return
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if result.stopped == "interrupted":
        launcher = "torchrun [the same options] -m " if dist.enabled else ""
        console.note(f"stopped at step {result.steps}, saved; continue with: "
                     f"{launcher}rnngen train --resume --out {out}")
        return
    best = result.best_val
    if not quiet:
        console.note(f"done ({result.stopped.replace('_', ' ')}) after {result.steps} steps, "
                     f"{result.elapsed:.0f} s; best validation {best.get('loss', float('nan')):.4f} nats/token, "
                     f"{best.get('bits_per_char', float('nan')):.3f} bits/char; saved in {out}")
        from .generate import Generator

        console.note(f"a sample (rnngen sample {out}):")
        for piece in Generator.load(out).generate(length=300, temperature=0.8, seed=0):
            console.stream(piece)
        console.stream("\n")


def _note_fine_tune(training: dict[str, Any], base: str) -> None:
    """What fine-tuning did to the base's vocabulary, and what it could not read."""
    from . import console

    if training.get("added_characters"):
        added = training["added_characters"]
        console.note(f"{len(added)} character(s) new to {base} added to its vocabulary: {added[:40]!r}"
                     f"{'...' if len(added) > 40 else ''}")
    if training.get("unknown_tokens"):
        console.warn(f"{training['unknown_tokens']:,} character(s) of the corpus, rarer than --min-char-count, "
                     "are read as <unk>")


def _run_trainer(trainer: Any, progress: Any, stop: Any, headline: str | None, dist: Any = None) -> Any:
    """Run a trainer under its run lock, with the progress bar; Ctrl-C or SIGTERM stop it after saving."""
    import signal
    import time

    from . import console
    from .checkpoint import run_lock
    from .distributed import Dist

    dist = dist or Dist()
    first_signal: list[float] = []

    def request_stop(signum: int, frame: Any) -> None:
        # Under torchrun a Ctrl-C reaches each process twice, from the terminal and from torchrun:
        # there a second signal counts only when it comes more than a second after the first.
        if stop.is_set() and not (dist.enabled and time.monotonic() - first_signal[0] < 1.0):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first_signal.append(time.monotonic())
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with dist.on_main(run_lock(trainer.run_dir)):
            if headline:
                console.note(headline)
            with progress:
                return trainer.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _default_out(corpus: tuple[str, ...], suffix: str = "") -> str:
    """checkpoints/NAME, or NAME-2, NAME-3... if taken."""
    name = Path(corpus[0]).stem if corpus else "builtin"
    base = Path("checkpoints") / ((name or "run") + suffix)
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


# --------------------------------------------------------------------------------------------- sample
@main.command(epilog="Examples:\n\n\b\n" + EXAMPLES["sample"])
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", "-p", default="", help="Text to start from (\\n for newline); it is printed first.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Start from the text of this file, as it is (UTF-8; - reads stdin); it is printed first.")
@click.option("--length", "-n", type=click.IntRange(min=0), default=500, show_default=True,
              help="Tokens to generate per sample.")
@click.option("--temperature", "-t", type=float, multiple=True, callback=_check_positive,
              help="Sampling temperature; repeat for one sample per value [default: 0.8].")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample only from the k most likely tokens.")
@click.option("--top-p", type=float, callback=_check_top_p, help="Nucleus sampling: smallest set with this mass.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per temperature, generated together as one batch.")
@click.option("--stop", multiple=True, help="End a sample at this string (repeatable; \\n allowed).")
@click.option("--seed", type=int, help="Same seed, same text.")
@click.option("--label", help="Generate for this label (models trained on labelled data; ends at a newline "
                              "unless --stop says otherwise).")
@click.option("--guidance", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="With --label: above 1, texts more typical of the label (classifier-free guidance; "
                   "needs a model trained with --label-dropout, the default).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help='Print the samples as one JSON list of {"temperature", "text"} (the text starts with the prompt).')
def sample(checkpoint: str, prompt: str, prompt_file: str | None, length: int, temperature: tuple[float, ...],
           top_k: int | None, top_p: float | None, greedy: bool, num_samples: int, stop: tuple[str, ...],
           seed: int | None, label: str | None, guidance: float, device: str, as_json: bool) -> None:
    """Generate text from a trained CHECKPOINT, streaming it to stdout.

    Several samples (--num-samples, or several -t) are printed one after another, a blank line apart,
    each under a header on stderr.
    """
    from . import console
    from .config import SampleConfig
    from .generate import Generator, make_generator
    from .runtime import resolve_device

    if prompt and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    gen = Generator.load(checkpoint, device=str(resolve_device(device)))
    from .chat import unescape

    prompt = unescape(prompt) if prompt_file is None else _read_text_file(prompt_file)
    _warn_unknown(gen, prompt, "the prompt")
    temperatures = temperature or (0.8,)
    from .generate import LABELLED_END

    stops = tuple(unescape(s) for s in stop) or (LABELLED_END if label is not None else ())
    configs = [SampleConfig(t, top_k, top_p, greedy, length, stops, seed) for t in temperatures]
    rng = make_generator(seed, gen.device)  # one stream of randomness across all samples
    with console.reading("reading the prompt", shown=len(prompt) > LONG_PROMPT_CHARS and not as_json) as progress:
        read = gen.start(prompt, label, guidance, progress)
    start = read.copy  # a fresh cursor for each sample; the prompt is read once
    if as_json:
        click.echo(json.dumps([{"temperature": c.temperature, "text": prompt + text} for c in configs
                               for text in gen.continue_many(start(), num_samples, c, rng)]))
        return
    many, shown = len(configs) * num_samples > 1, 0
    for config in configs:
        # One sample streams as it is generated; several are generated together, as one batch.
        samples = ([gen.continue_from(start(), config, rng)] if num_samples == 1 else
                   [[text] for text in gen.continue_many(start(), num_samples, config, rng)])
        for i, pieces in enumerate(samples):
            if many:
                if shown:
                    console.stream("\n")
                console.stderr.rule(f"temperature {config.temperature:g}, sample {i + 1}/{num_samples}",
                                    characters="-", style="dim")
            console.stream(prompt)
            for piece in pieces:
                console.stream(piece)
            console.stream("\n")
            shown += 1


def _warn_unknown(gen: Any, text: str, what: str) -> None:
    """Warn of characters the model will read as <unk> (all of them unknown is an error, raised when read)."""
    from . import console

    unknown = gen.unknown_characters(text)
    if 0 < unknown < len(text):
        console.warn(f"{unknown} character(s) of {what} are not in the model's vocabulary; read as <unk>")


def _read_text_file(path: str, what: str = "prompt file", stdin: bool = True) -> str:
    """The text of a file (``-``: stdin, where ``stdin`` allows), exactly as it is; bad or empty input is an
    InputError."""
    from .corpora import check_readable_file, iter_file_text
    from .errors import InputError

    if path == "-" and not stdin:
        raise InputError(f"the {what} cannot come from stdin, which carries the conversation; pass a file")
    if path != "-":
        return "".join(iter_file_text(check_readable_file(path, what)))
    try:
        text = sys.stdin.buffer.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"the prompt on stdin is not valid UTF-8 at byte {exc.start}; convert it to UTF-8") from None
    if not text:
        raise InputError("--prompt-file - read nothing from stdin; pipe the prompt's text in")
    return text


# ----------------------------------------------------------------------------------------------- eval
@main.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def eval_(checkpoint: str, file: str, encoding: str, errors: str, device: str, as_json: bool) -> None:
    """Loss of a text FILE under CHECKPOINT: nats/char, bits/char and perplexity.

    Example: rnngen eval checkpoints/mine held_out.txt --json
    """
    from . import console
    from .corpora import resolve_corpus
    from .generate import Generator
    from .runtime import resolve_device

    text = resolve_corpus([file], encoding, errors).read()
    gen = Generator.load(checkpoint, device=str(resolve_device(device)))
    result = gen.evaluate(text)
    if result["unknown_characters"]:
        console.warn(f"{result['unknown_characters']} character(s) of {file} are not in the model's vocabulary")
    if as_json:
        click.echo(json.dumps(result))
        return
    console.stdout.print(f"[bold]{file}[/] under {gen.directory}")
    console.stdout.print(console.key_value_table({
        "nats/char": result["nats_per_char"], "bits/char": result["bits_per_char"],
        "nats/token": result["loss"], "perplexity (per token)": result["perplexity"],
        "tokens scored": result["tokens"]}))


# ----------------------------------------------------------------------------------------------- info
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print config.json and the metrics history as JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Describe a CHECKPOINT: model, tokenizer, training history, best validation loss."""
    from . import console
    from .checkpoint import read_metrics
    from .generate import Generator

    gen = Generator.load(checkpoint)
    config, metrics = gen.config, read_metrics(gen.run_dir)
    if as_json:
        click.echo(json.dumps({"directory": str(gen.directory), "config": config, "metrics": metrics}))
        return
    m, t = config["model"], config.get("training", {})
    best = t.get("best_val") or {}
    classifier = gen.model.classifier
    tok = gen.tokenizer
    vocab_preview = "".join(tok.decode([i]) for i in range(1, min(tok.vocab_size, 80)))
    if classifier is not None and "accuracy" in best:
        vote = config.get("classify", {}).get("lm_vote", 0.0)
        best_text = (f"accuracy {best['accuracy']:.4f}, macro-F1 {best['macro_f1']:.4f}"
                     + (f" (with the language model's vote, weight {vote:g})" if vote else ""))
    else:
        best_text = f"{best['loss']:.4f} nats/token, {best['bits_per_char']:.4f} bits/char" if best else "-"
    console.stdout.print(f"[bold]{gen.directory}[/]")
    console.stdout.print(console.key_value_table({
        "model": f"{m['arch']} {m['layers']}x{m['hidden']}, embedding {m['emb_dim']}, dropout {m['dropout']}"
                 f"{', tied' if m.get('tie_weights') else ''}{', bidirectional' if m.get('bidirectional') else ''}",
        "parameters": f"{gen.model.num_parameters():,}",
        "tokenizer": f"{tok.kind}, {tok.vocab_size} symbols",
        "vocabulary": repr(vocab_preview) if tok.kind == "char" else "(subwords)",
        **({"classes": f"{len(classifier.classes)}: {', '.join(classifier.classes)}"} if classifier else {}),
        "corpus": t.get("corpus") or t.get("data") or "-",
        **({"fine-tuned from": t["base"]} if t.get("base") else {}), "steps": t.get("step"),
        "training time": f"{t.get('seconds', 0):.0f} s", "best step": t.get("best_step"),
        "best validation": best_text, "written by": f"rnngen {config.get('rnngen_version', '?')}"}))
    if metrics:
        columns = {"train loss": "train_loss", "val loss": "val_loss", "bits/char": "val_bits_per_char"}
        if any("val_accuracy" in r for r in metrics):
            columns = {"train loss": "train_loss", "val loss": "val_loss", "val accuracy": "val_accuracy",
                       "LM bits/char": "val_lm_bits_per_char"}
        table = console.Table(title="history (metrics.jsonl)", title_justify="left")
        for col in ("step", "seconds", *columns):
            table.add_column(col, justify="right")
        shown = metrics if len(metrics) <= 12 else metrics[:4] + metrics[-8:]
        for r in shown:
            table.add_row(str(r["step"]), f"{r['seconds']:.0f}", *(console.fmt(r.get(k)) for k in columns.values()))
        console.stdout.print(table)
    sampled = [r for r in metrics if r.get("sample") is not None]
    if sampled:  # what the model wrote at its last evaluation (`rnngen train --sample-length`)
        console.stdout.print(f"[bold]sample at step {sampled[-1]['step']}[/] (metrics.jsonl):")
        console.stdout.print(console.Text(sampled[-1]["sample"].rstrip("\n")), soft_wrap=True)


# ----------------------------------------------------------------------------------------------- plot
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--output", "-o", default="curve.png", show_default=True, type=click.Path(dir_okay=False))
def plot(checkpoint: str, output: str) -> None:
    """Plot training and validation loss of a run against step and time (needs rnngen[plot]).

    Example: rnngen plot checkpoints/mine -o curve.png
    """
    from . import console
    from .checkpoint import read_metrics, resolve_checkpoint_dir, run_dir_of
    from .errors import InputError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'rnngen[plot]'") from None
    metrics = read_metrics(run_dir_of(resolve_checkpoint_dir(checkpoint)))
    if not metrics:
        raise InputError(f"{checkpoint} has no metrics.jsonl records to plot; train for at least one evaluation")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "seconds", "seconds")):
        xs = [r[key] for r in metrics]
        ax.plot(xs, [r.get("train_loss") for r in metrics], label="train (smoothed)")
        ax.plot(xs, [r["val_loss"] for r in metrics], label="validation", marker=".")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    fig.suptitle(str(checkpoint))
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=110)
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror}") from None
    console.note(f"wrote {output}")


# ----------------------------------------------------------------------------------------------- chat
CHAT_EXAMPLES = (
    "rnngen chat checkpoints/mine                           # type a line, the model continues it\n"
    "rnngen chat checkpoints/shakespeare --user-prefix 'ROMEO:' --bot-prefix 'JULIET:' --stop '\\n\\n'\n"
    "rnngen chat checkpoints/mine -t 0.5 --top-p 0.9 --length 200 --seed 1\n"
    "printf 'It was\\n/temp 0.3\\nAnd then\\n' | rnngen chat checkpoints/mine   # scripted: plain text out\n"
    "rnngen chat checkpoints/shakespeare --context-file scene.txt   # read a scene (or a /save file) first")


@main.command(epilog="Examples:\n\n\b\n" + CHAT_EXAMPLES)
@click.argument("checkpoint", type=click.Path())
@click.option("--length", "-n", type=click.IntRange(min=0), default=300, show_default=True,
              help="Tokens per reply at most.")
@click.option("--temperature", "-t", type=float, default=0.8, show_default=True, callback=_check_positive,
              help="Sampling temperature.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample only from the k most likely tokens.")
@click.option("--top-p", type=float, callback=_check_top_p, help="Nucleus sampling: smallest set with this mass.")
@click.option("--stop", multiple=True, help="End a reply at this string (repeatable; \\n allowed) [default: \\n\\n].")
@click.option("--user-prefix", default="", help="Put before each of your lines, e.g. 'ROMEO:' (\\n allowed).")
@click.option("--bot-prefix", default="", help="Put before each reply, e.g. 'JULIET:' (\\n allowed).")
@click.option("--seed", type=int, help="Same seed and same lines, same conversation.")
@click.option("--context-file", type=click.Path(dir_okay=False),
              help="Text the model reads before the conversation, as it is (a scene, earlier dialogue, a file "
                   "written by /save); /reset comes back to it.")
@click.option("--device", default="cpu", show_default=True)
def chat(checkpoint: str, length: int, temperature: float, top_k: int | None, top_p: float | None,
         stop: tuple[str, ...], user_prefix: str, bot_prefix: str, seed: int | None, context_file: str | None,
         device: str) -> None:
    """Talk with a model from CHECKPOINT: each line you type joins the conversation and the model replies.

    The recurrent state is carried from turn to turn, so a turn costs only its new tokens. With a bot
    prefix each line is fed as "{user-prefix} {line}{stop}{bot-prefix}" (stop: the first --stop);
    without one the model simply continues your line. Type /help inside for the slash commands
    (/temp, /len, /stop, /undo, /reset, /save FILE, ...). Ctrl-C stops a reply, Ctrl-D leaves.
    Input history is kept in $XDG_STATE_HOME/rnngen/chat_history. With piped input it reads lines
    and writes each reply as plain text.
    """
    from .chat import DEFAULT_STOP, ChatSession, unescape
    from .config import SampleConfig
    from .generate import Generator
    from .runtime import resolve_device

    stops = tuple(unescape(s) for s in stop) if stop else DEFAULT_STOP
    config = SampleConfig(temperature, top_k, top_p, False, length, stops, seed)
    from . import console

    primer = _read_text_file(context_file, "context file", stdin=False) if context_file else ""
    gen = Generator.load(checkpoint, device=str(resolve_device(device)))
    _warn_unknown(gen, primer, "the context")
    with console.reading("reading the context", shown=len(primer) > LONG_PROMPT_CHARS) as progress:
        session = ChatSession(gen, config, unescape(user_prefix), unescape(bot_prefix), primer, progress)
    if sys.stdin.isatty() and sys.stdout.isatty():
        _chat_terminal(session)
    else:
        _chat_piped(session)


def _chat_piped(session: Any) -> None:
    """Scripted use: one input per line (or a \"\"\" block), each reply written as plain text."""
    from . import console
    from .chat import MultiLine

    joiner = MultiLine()
    for raw in sys.stdin:
        text = joiner.push(raw.rstrip("\r\n"))
        if text is not None and not _chat_run(session, text, interactive=False):
            return
    if joiner.active:
        console.warn('the input ended inside a """ block; that block was not sent')


def _chat_terminal(session: Any) -> None:
    """The interactive REPL: prompt_toolkit for editing and history, Ctrl-C stops a reply."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from . import console
    from .chat import MultiLine, state_dir

    history: History
    try:
        path = state_dir() / "chat_history"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = FileHistory(str(path))
    except OSError as exc:
        console.warn(f"input history will not be kept ({exc.strerror}: {exc.filename})")
        history = InMemoryHistory()
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:  # Esc then Enter (or Alt+Enter): a newline inside the input
        event.current_buffer.insert_text("\n")

    prompt: PromptSession[str] = PromptSession(history=history, key_bindings=bindings)
    label = (session.user_prefix.strip() or ">") + " "
    joiner = MultiLine()
    console.note(f"chatting with {session.gen.directory}: /help for commands, Ctrl-C stops a reply, Ctrl-D leaves")
    while True:
        try:
            line = prompt.prompt("... " if joiner.active else label)
        except KeyboardInterrupt:  # at the prompt: the line is dropped (and a """ block being typed)
            if joiner.active:
                joiner.cancel()
                console.note("multi-line input dropped")
            continue
        except EOFError:
            return
        text = joiner.push(line)
        if text is not None and not _chat_run(session, text, interactive=True):
            return


def _chat_run(session: Any, text: str, interactive: bool) -> bool:
    """Render the events answering one input; False when the user asked to quit."""
    from . import console
    from .chat import Info, Notice, Problem, Quit, Reply, TurnEnd, TurnStart

    events = session.handle(text)
    try:
        for event in events:
            if isinstance(event, Quit):
                return False
            if isinstance(event, TurnStart) and interactive and session.bot_prefix:
                console.stream(session.bot_prefix)
            elif isinstance(event, Reply):
                console.stream(event.text)
            elif isinstance(event, TurnEnd):
                console.stream("\n")
            elif isinstance(event, Info):
                click.echo(event.text)
            elif isinstance(event, Notice):
                console.note(event.text)
            elif isinstance(event, Problem):
                console.error(event.text)
    except KeyboardInterrupt:
        if not interactive:
            raise
        events.close()  # the reply ends at the last whole token; the state keeps what was generated
        console.stream("\n")
        console.note("(reply stopped; /undo forgets this turn)")
    return True


# ------------------------------------------------------------------------------------------- classify
CLASSIFY_EXAMPLES = (
    "rnngen classify train names/ --out checkpoints/names-cls            # a folder of <class>.txt files\n"
    "rnngen classify train news.csv --text-column title,description --from checkpoints/news-lm\n"
    "rnngen classify train test.csv --no-header --text-column 2,3 --label-column 1 --balance\n"
    "rnngen classify predict checkpoints/names-cls Nakamura Schmidt --top 3\n"
    "cat names.txt | rnngen classify predict checkpoints/names-cls - --json\n"
    "rnngen classify eval checkpoints/names-cls held_out.csv\n"
    "rnngen sample checkpoints/names-cls --label Russian --num-samples 5   # it still generates")


def data_options(command: Any) -> Any:
    """How labelled data is read (shared by `classify train` and `classify eval`)."""
    for option in reversed([
        click.option("--text-column", default="text", show_default=True,
                     help="Text column(s) or JSONL key(s), comma-separated (joined with a space); "
                          "numbers (from 1) without a header."),
        click.option("--label-column", default="label", show_default=True, help="Label column or JSONL key."),
        click.option("--no-header", is_flag=True, help="CSV/TSV without a header row: columns by number."),
        click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "jsonl", "class-files", "class-folders"]),
                     help="Data format [default: from the path]."),
        click.option("--encoding", default="utf-8", show_default=True),
        click.option("--skip-bad-rows", is_flag=True, help="Skip (and count) bad rows instead of stopping."),
    ]):
        command = option(command)
    return command


def _vote(value: str | None) -> float | None:
    """--lm-vote: a weight, or None for auto (not given, or 'auto')."""
    if value is None or value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto", param_hint="--lm-vote") from None


def _read_options(text_column: str, label_column: str, no_header: bool, fmt: str | None, encoding: str,
                  skip_bad_rows: bool) -> dict[str, Any]:
    from .labelled import parse_columns

    label = parse_columns(label_column)
    if len(label) != 1:
        raise click.BadParameter("give one label column", param_hint="--label-column")
    return {"text_columns": parse_columns(text_column), "label_column": label[0], "header": not no_header,
            "fmt": fmt, "encoding": encoding, "skip_bad_rows": skip_bad_rows}


@main.group(epilog="Examples:\n\n\b\n" + CLASSIFY_EXAMPLES)
def classify() -> None:
    """Classify texts with the encoder a language model shares (train, predict, eval)."""


@classify.command(name="train")
@click.argument("data", nargs=-1)
@click.option("--from", "base", type=click.Path(), metavar="CHECKPOINT", help="Fine-tune the encoder of this language-model checkpoint.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory [default: checkpoints/NAME-cls].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@data_options
@model_options
@click.option("--bidirectional", is_flag=True, help="A bidirectional encoder (classifies, cannot generate).")
@click.option("--batch-size", "-b", type=int, help="Texts per batch [default: 32].")
@click.option("--lr", type=float, help="Peak learning rate of the top layers [default: 0.002].")
@click.option("--lr-decay", type=float, help="Fine-tuning: each lower layer group learns this much slower "
                                             "[default: 2.6].")
@click.option("--unfreeze-every", type=int, help="Fine-tuning: unfreeze one more layer group every N steps "
                                                 "[default: one epoch].")
@optimizer_options
@click.option("--max-epochs", type=int, help="Passes over the training texts [default: 10].")
@click.option("--max-steps", type=int, help="Stop after this many steps (instead of --max-epochs).")
@click.option("--max-time", type=float, help="Stop after this many seconds (the schedule fits it).")
@click.option("--eval-every", type=int, help="Evaluate and checkpoint every N steps [default: every epoch].")
@click.option("--patience", type=int, help="Stop after N evaluations without better accuracy [default: 3].")
@click.option("--max-len", type=int, help="Tokens of each text read (its beginning) [default: 256].")
@click.option("--val-fraction", type=float, help="Share of each class held out [default: 0.2].")
@click.option("--balance", is_flag=True, default=None, help="Weight classes by inverse frequency.")
@click.option("--lm-weight", type=float, help="Weight of the auxiliary language-model loss on the texts, which "
                                              "keeps the model generating (0 = off) [default: 0.5].")
@click.option("--label-dropout", type=float, help="Share of the language-model texts read without their label, "
                                                  "so that `sample --guidance` works [default: 0.1].")
@click.option("--head-dropout", type=float, help="Dropout before the classifier [default: 0.2].")
@click.option("--token-dropout", type=float, help="Share of each training text's tokens read as <unk> by the "
                                                  "classifier (word dropout) [default: 0].")
@click.option("--lm-vote", callback=lambda ctx, param, value: _vote(value), metavar="WEIGHT|auto",
              help="Weight of the language model's vote in classification: its log p(text | label) + log p(label), "
                   "added to the head's log-probabilities [default: auto, chosen on the validation set; 0 = the "
                   "head alone].")
@click.option("--label-smoothing", type=float, help="Share of each training target spread evenly over all classes "
                                                    "[default: 0].")
@click.option("--seed", type=int, help="Random seed (also fixes the split) [default: 1337].")
@click.option("--device", help="auto, cpu, cuda or mps [default: auto].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object on stdout.")
def classify_train(data: tuple[str, ...], base: str | None, out: str | None, resume: bool, text_column: str,
                   label_column: str, no_header: bool, fmt: str | None, encoding: str, skip_bad_rows: bool,
                   arch: str | None, layers: int | None, hidden: int | None, emb_dim: int | None,
                   dropout: float | None, emb_dropout: float | None, weight_drop: float | None,
                   tie_weights: bool | None, tokenizer: str | None, vocab_size: int | None,
                   min_char_count: int | None, bidirectional: bool, quiet: bool, as_json: bool,
                   **options: Any) -> None:
    """Train a classifier on labelled DATA: CSV/TSV, JSONL, or a folder of class files or class folders.

    From scratch, or with --from fine-tuning a trained language model (its tokenizer is kept; lower
    layers learn slower and are unfrozen gradually). An auxiliary language-model loss, each text read
    after its label's token, keeps the checkpoint generating: `rnngen sample CKPT --label NAME`.
    The split is stratified and de-duplicated; the best validation accuracy is kept in best/.
    """
    import threading

    from . import console
    from .classify import prepare_classifier

    if resume and not out:
        raise click.UsageError("--resume needs --out DIR, the run to continue")
    if not data and not resume:
        raise click.UsageError("give the labelled data: a CSV/TSV/JSONL file or a folder")
    out = out or _default_out(data, suffix="-cls")
    stop = threading.Event()
    progress = console.TrainProgress(enabled=not (quiet or as_json))
    trainer = prepare_classifier(
        list(data), out, base=base, resume=resume, bidirectional=bidirectional,
        model_options={"arch": arch, "layers": layers, "hidden": hidden, "emb_dim": emb_dim, "dropout": dropout,
                       "emb_dropout": emb_dropout, "weight_drop": weight_drop, "tie_weights": tie_weights},
        tokenizer_options={"tokenizer": tokenizer, "vocab_size": vocab_size, "min_char_count": min_char_count},
        read_options=_read_options(text_column, label_column, no_header, fmt, encoding, skip_bad_rows),
        callback=progress.update, stop=stop, **options)
    t = trainer.meta["training"]
    if not (quiet or as_json):
        if t.get("skipped"):
            console.warn(f"{sum(t['skipped'].values())} bad row(s) skipped: "
                         + ", ".join(f"{n} {why}" for why, n in t["skipped"].items()))
        if t.get("unknown_characters") and base:
            console.warn(f"{t['unknown_characters']} character(s) of the data are not in {base}'s vocabulary; "
                         "read as <unk>")
    head = trainer.model.classifier
    assert head is not None  # a classifier run always has its head
    classes = head.classes
    headline = (f"{'resuming at step ' + str(trainer.pos.step) if resume else 'training'} a classifier on "
                f"{t.get('data')}: {len(classes)} classes, {len(trainer.train):,} training / {len(trainer.val):,} "
                f"validation texts ({t.get('duplicates_removed', 0):,} duplicates removed), "
                f"{'fine-tuning ' + str(base) if base else 'from scratch'}, {trainer.model.num_parameters():,} "
                f"parameters, device {trainer.device.type}, into {out}")
    result = _run_trainer(trainer, progress, stop, None if quiet or as_json else headline)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if result.stopped == "interrupted":
        console.note(f"stopped at step {result.steps}, saved; continue with: rnngen classify train --resume "
                     f"--out {out}")
        return
    best = result.best_val
    if not quiet:
        console.note(f"done ({result.stopped.replace('_', ' ')}) after {result.steps} steps, {result.elapsed:.0f} s; "
                     f"best validation accuracy {best.get('accuracy', float('nan')):.4f}, macro-F1 "
                     f"{best.get('macro_f1', float('nan')):.4f}"
                     + (f" (with the language model's vote, weight {best['lm_vote']:g})" if best.get("lm_vote") else "")
                     + f"; saved in {out}")


def _input_texts(texts: tuple[str, ...], file: str | None, encoding: str) -> list[str]:
    """TEXT arguments, lines of --file, and lines of stdin for '-'."""
    from .corpora import resolve_corpus

    lines: list[str] = []
    for text in texts:
        lines += [line for line in sys.stdin.read().splitlines() if line.strip()] if text == "-" else [text]
    if file:
        source = sys.stdin.read() if file == "-" else resolve_corpus([file], encoding, "strict").read()
        lines += [line for line in source.splitlines() if line.strip()]
    if not lines:
        raise click.UsageError("nothing to classify: give TEXT arguments, --file FILE, or - to read stdin")
    return lines


vote_override = click.option("--lm-vote", type=click.FloatRange(min=0), help="Weight of the language model's vote "
                             "[default: the checkpoint's, chosen in training; 0 = the head alone, faster].")


@classify.command(name="predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("texts", nargs=-1)
@click.option("--file", "-f", type=click.Path(), help="Classify each non-empty line of this file ('-': stdin).")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True, help="Classes shown per text.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@vote_override
def classify_predict(checkpoint: str, texts: tuple[str, ...], file: str | None, top: int, encoding: str,
                     device: str, as_json: bool, lm_vote: float | None) -> None:
    """Label each TEXT (or each line of --file, or of stdin with '-'): one line per input.

    Each line: the label, its probability, further classes with --top, then the text.
    """
    from .generate import Generator
    from .runtime import resolve_device

    gen = Generator.load(checkpoint, device=str(resolve_device(device)))
    inputs = _input_texts(texts, file, encoding)
    for text, result in zip(inputs, gen.classify(inputs, top=top, lm_vote=lm_vote)):
        if as_json:
            click.echo(json.dumps({"text": text, **result}, ensure_ascii=False))
        else:
            ranked = "\t".join(f"{r['label']}\t{r['probability']:.3f}" for r in result["top"])
            click.echo(f"{ranked}\t{text}")


@classify.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("data", nargs=-1, required=True)
@data_options
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@vote_override
def classify_eval(checkpoint: str, data: tuple[str, ...], text_column: str, label_column: str, no_header: bool,
                  fmt: str | None, encoding: str, skip_bad_rows: bool, device: str, as_json: bool,
                  lm_vote: float | None) -> None:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of CHECKPOINT on DATA."""
    from . import console
    from .classify import evaluate_classifier
    from .generate import Generator
    from .labelled import read_labelled
    from .runtime import resolve_device

    gen = Generator.load(checkpoint, device=str(resolve_device(device)))
    labelled = read_labelled(list(data), min_classes=1, **{k: v for k, v in _read_options(
        text_column, label_column, no_header, fmt, encoding, skip_bad_rows).items() if v is not None})
    result = evaluate_classifier(gen.model, gen.tokenizer, gen.config, labelled, gen.device, lm_vote)
    if as_json:
        click.echo(json.dumps(result))
        return
    if labelled.skipped:
        console.warn(labelled.skipped_summary())
    console.stdout.print(f"[bold]{', '.join(data)}[/] under {gen.directory}")
    console.stdout.print(console.key_value_table({"examples": result["examples"], "accuracy": result["accuracy"],
                                                  "macro-F1": result["macro_f1"],
                                                  "LM vote (weight)": f"{result['lm_vote']:g}"}))
    console.stdout.print(console.classification_tables(result))
