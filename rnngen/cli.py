"""The `rnngen` command: a thin click layer over the library that parses and renders, nothing more.

torch is imported only by the commands that use it. Options that set a configuration field are generated
from the field (config.py): its name, its help and its default are written once, there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

import click

from .config import ClassifyConfig, ModelConfig, TokenizerConfig, TrainConfig, flag
from .version import __version__

LONG_PROMPT_CHARS = 100_000  # `rnngen sample` shows a bar while it reads a longer prompt (seconds on a CPU)
SAMPLE_LENGTH = 200  # tokens shown at each evaluation of `rnngen train` when a person is watching
FINAL_SAMPLE = 300  # tokens of the sample printed when `rnngen train` ends

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

    debug = os.environ.get("RNNGEN_DEBUG") == "1"  # --debug sets it for the command being run

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
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

            if self.debug:
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


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        RnngenGroup.debug = True
    return value


@click.group(cls=RnngenGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rnngen")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show full tracebacks on errors.")
def main() -> None:
    """Train recurrent language models on your own text, then generate from them."""


# -------------------------------------------------------------------------------------- shared pieces
def _default_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _field_option(f: dataclasses.Field) -> Callable[[Any], Any]:
    """The click option of a configuration field (see config.option); flags default to off."""
    meta, kind = f.metadata, str(f.type).replace(" | None", "")
    decls = [flag(f.name), *([meta["short"]] if "short" in meta else [])]
    if kind == "bool":
        return click.option(*decls, is_flag=True, default=None, help=meta["help"])
    shown = meta.get("shown", _default_text(f.default))
    kind_type = click.Choice(meta["choices"]) if "choices" in meta else {"int": int, "float": float, "str": str}[kind]
    return click.option(*decls, type=kind_type, default=None, metavar=meta.get("metavar"),
                        help=f"{meta['help']} [default: {shown}]")


def config_options(cls: type, skip: Collection[str] = (), **special: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The options of a configuration class's fields (none for internal ones or those in ``skip``); a field named
    in ``special`` gets that option instead. Unset options arrive as None: the configuration's default applies."""
    def decorate(command: Any) -> Any:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip or f.metadata.get("cli") is False:
                continue
            command = (special[f.name] if f.name in special else _field_option(f))(command)
        return command
    return decorate


def _load(checkpoint: str, device: str = "cpu") -> Any:
    """The LoadedModel of CHECKPOINT on --device."""
    from .loaded import LoadedModel
    from .runtime import resolve_device

    return LoadedModel.load(checkpoint, device=str(resolve_device(device)))


def _read_stdin(what: str) -> str:
    """All of stdin as UTF-8 text (a byte-order mark dropped); bad or empty input is an InputError."""
    from .errors import InputError

    try:
        text = sys.stdin.buffer.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} on stdin is not valid UTF-8 at byte {exc.start}; convert it to UTF-8") from None
    if not text:
        raise InputError(f"read nothing from stdin, where {what} was to come from; pipe the text in")
    return text


def _read_text_file(path: str, what: str = "prompt file", stdin: bool = True) -> str:
    """The text of a file (``-``: stdin, where ``stdin`` allows), exactly as it is; bad or empty input is an
    InputError."""
    from .corpora import check_readable_file, iter_file_text
    from .errors import InputError

    if path == "-" and not stdin:
        raise InputError(f"the {what} cannot come from stdin, which carries the conversation; pass a file")
    if path != "-":
        return "".join(iter_file_text(check_readable_file(path, what)))
    return _read_stdin(f"the {what.replace(' file', '')}")


def _warn_unknown(gen: Any, text: str, what: str) -> None:
    """Warn of characters the model will read as <unk> (all of them unknown is an error, raised when read)."""
    from . import console

    unknown = gen.unknown_characters(text)
    if 0 < unknown < len(text):
        console.warn(f"{unknown} character(s) of {what} are not in the model's vocabulary; read as <unk>")


def _default_out(corpus: tuple[str, ...], suffix: str = "") -> str:
    """checkpoints/NAME, or NAME-2, NAME-3... if taken."""
    name = Path(corpus[0]).stem if corpus else "builtin"
    base = Path("checkpoints") / ((name or "run") + suffix)
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def _train_until_done(trainer: Any, quiet: bool) -> Any:
    """Run a trainer to its end (lock, signals: see loop.run_to_end) under a progress display; under torchrun
    only rank 0 shows anything."""
    from . import console
    from .loop import run_to_end

    progress = console.TrainProgress(shown=not quiet, warnings=trainer.dist.is_main)
    trainer.callback = progress.update
    with progress:
        return run_to_end(trainer)


def _stopped_note(result: Any, resume_command: str) -> bool:
    """Say how to continue an interrupted run; True if it was interrupted."""
    from . import console

    if result.stopped != "interrupted":
        return False
    console.note(f"stopped at step {result.steps}, saved; continue with: {resume_command}")
    return True


# ---------------------------------------------------------------------------------------------- train
@main.command(epilog="Examples:\n\n\b\n" + EXAMPLES["train"])
@click.argument("corpus", nargs=-1)
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory [default: checkpoints/NAME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--from", "base", type=click.Path(), metavar="CHECKPOINT",
              help="Fine-tune this trained model on CORPUS (its network and vocabulary; new characters are "
                   "added) instead of starting from scratch.")
@config_options(ModelConfig, skip=("bidirectional",))
@config_options(TokenizerConfig)
@config_options(TrainConfig)
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the corpus files.")
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True,
              help="What to do with undecodable bytes.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object on stdout.")
def train(corpus: tuple[str, ...], out: str | None, resume: bool, base: str | None, encoding: str, errors: str,
          quiet: bool, as_json: bool, **options: Any) -> None:
    """Train a language model on CORPUS (text files, folders of them, or a named data set: tinyshakespeare, names).

    With no CORPUS it trains on a built-in corpus: the help pages of this Python installation.
    Writes best/ and last/ checkpoints and metrics.jsonl into --out. Ctrl-C stops after saving;
    --resume continues where it stopped. --from starts from a trained model instead of from scratch.
    """
    from . import console
    from .distributed import session
    from .training import prepare_run

    if resume and not out:
        raise click.UsageError("--resume needs --out DIR, the run to continue")
    out = out or _default_out(corpus)
    with session() as dist:  # several processes under torchrun: only rank 0 shows anything
        quiet = quiet or as_json or not dist.is_main
        if options["sample_length"] is None:  # samples are for a person watching the progress bar
            options["sample_length"] = 0 if quiet else SAMPLE_LENGTH
        trainer = prepare_run(list(corpus), out, resume=resume, encoding=encoding, errors=errors, dist=dist,
                              base=base, **options)
        if base and not quiet:
            _note_fine_tune(trainer.meta["training"], base)
        result = _train_until_done(trainer, quiet)
    if not dist.is_main:
        return
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    launcher = "torchrun [the same options] -m " if dist.enabled else ""
    if _stopped_note(result, f"{launcher}rnngen train --resume --out {out}") or quiet:
        return
    best = result.best_val
    console.note(f"done ({result.stopped.replace('_', ' ')}) after {result.steps} steps, {result.elapsed:.0f} s; "
                 f"best validation {best.get('loss', float('nan')):.4f} nats/token, "
                 f"{best.get('bits_per_char', float('nan')):.3f} bits/char; saved in {out}")
    console.note(f"a sample (rnngen sample {out}):")
    for piece in _load(out).generate(length=FINAL_SAMPLE, temperature=0.8, seed=0):
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
    from .chat import unescape
    from .config import SampleConfig
    from .generate import random_stream

    if prompt and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    gen = _load(checkpoint, device)
    prompt = unescape(prompt) if prompt_file is None else _read_text_file(prompt_file)
    _warn_unknown(gen, prompt, "the prompt")
    configs = [SampleConfig.for_label(label, tuple(unescape(s) for s in stop), temperature=t, top_k=top_k,
                                      top_p=top_p, greedy=greedy, length=length, seed=seed)
               for t in temperature or (0.8,)]
    rng = random_stream(seed, gen.device)  # one stream of randomness across all samples
    with console.reading("reading the prompt", shown=len(prompt) > LONG_PROMPT_CHARS and not as_json) as progress:
        read = gen.start(prompt, label, guidance, progress)  # the prompt is read once, each sample starts there
    if as_json:
        click.echo(json.dumps([{"temperature": c.temperature, "text": prompt + text} for c in configs
                               for text in gen.continue_many(read.copy(), num_samples, c, rng)]))
        return
    many, shown = len(configs) * num_samples > 1, 0
    for config in configs:
        # One sample streams as it is generated; several are generated together, as one batch.
        samples = ([gen.continue_from(read.copy(), config, rng)] if num_samples == 1 else
                   [[text] for text in gen.continue_many(read.copy(), num_samples, config, rng)])
        for i, pieces in enumerate(samples):
            if many:
                if shown:
                    console.stream("\n")
                console.rule(f"temperature {config.temperature:g}, sample {i + 1}/{num_samples}")
            console.stream(prompt)
            for piece in pieces:
                console.stream(piece)
            console.stream("\n")
            shown += 1


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

    text = resolve_corpus([file], encoding, errors, what="text file").read()
    gen = _load(checkpoint, device)
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
        "tokens scored": result["tokens"]}), soft_wrap=True)


# ----------------------------------------------------------------------------------------------- info
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary shown (with the whole history) as JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Describe a CHECKPOINT: model, tokenizer, training history, best validation loss."""
    from . import console

    summary = _load(checkpoint).summary()
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
        return
    console.info(summary)


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

    metrics = read_metrics(run_dir_of(resolve_checkpoint_dir(checkpoint)))
    console.plot_curves(metrics, checkpoint, output)
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
    from . import console
    from .chat import DEFAULT_STOP, ChatSession, unescape
    from .config import SampleConfig

    stops = tuple(unescape(s) for s in stop) if stop else DEFAULT_STOP
    config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length, stop=stops, seed=seed)
    primer = _read_text_file(context_file, "context file", stdin=False) if context_file else ""
    gen = _load(checkpoint, device)
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


def _vote(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """--lm-vote: a weight, or None for auto (not given, or 'auto')."""
    if value is None or value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto", param_hint="--lm-vote") from None


def _read_options(text_column: str, label_column: str, no_header: bool, fmt: str | None, encoding: str,
                  skip_bad_rows: bool) -> dict[str, Any]:
    """The data options as ReadConfig's fields."""
    from .labelled import parse_columns

    label = parse_columns(label_column)
    if len(label) != 1:
        raise click.BadParameter("give one label column", param_hint="--label-column")
    return {"text_columns": tuple(parse_columns(text_column)), "label_column": label[0], "header": not no_header,
            "fmt": fmt, "encoding": encoding, "skip_bad_rows": skip_bad_rows}


@main.group(epilog="Examples:\n\n\b\n" + CLASSIFY_EXAMPLES)
def classify() -> None:
    """Classify texts with the encoder a language model shares (train, predict, eval)."""


_lm_vote_field = {f.name: f for f in dataclasses.fields(ClassifyConfig)}["lm_vote"]


@classify.command(name="train")
@click.argument("data", nargs=-1)
@click.option("--from", "base", type=click.Path(), metavar="CHECKPOINT",
              help="Fine-tune the encoder of this language-model checkpoint.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory [default: checkpoints/NAME-cls].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@data_options
@config_options(ModelConfig)
@config_options(TokenizerConfig)
@config_options(ClassifyConfig, lm_vote=click.option(
    "--lm-vote", callback=_vote, metavar=_lm_vote_field.metadata["metavar"],
    help=f"{_lm_vote_field.metadata['help']} [default: {_lm_vote_field.metadata['shown']}]"))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object on stdout.")
def classify_train(data: tuple[str, ...], base: str | None, out: str | None, resume: bool, text_column: str,
                   label_column: str, no_header: bool, fmt: str | None, encoding: str, skip_bad_rows: bool,
                   quiet: bool, as_json: bool, **options: Any) -> None:
    """Train a classifier on labelled DATA: CSV/TSV, JSONL, or a folder of class files or class folders.

    From scratch, or with --from fine-tuning a trained language model (its tokenizer is kept; lower
    layers learn slower and are unfrozen gradually). An auxiliary language-model loss, each text read
    after its label's token, keeps the checkpoint generating: `rnngen sample CKPT --label NAME`.
    The split is stratified and de-duplicated; the best validation accuracy is kept in best/.
    """
    from . import console
    from .classify import prepare_classifier

    if resume and not out:
        raise click.UsageError("--resume needs --out DIR, the run to continue")
    if not data and not resume:
        raise click.UsageError("give the labelled data: a CSV/TSV/JSONL file or a folder")
    out = out or _default_out(data, suffix="-cls")
    quiet = quiet or as_json
    with console.working("reading the data, fitting the tokenizer and the bag of n-grams", shown=not quiet):
        trainer = prepare_classifier(list(data), out, base=base, resume=resume, **options,
                                     **_read_options(text_column, label_column, no_header, fmt, encoding,
                                                     skip_bad_rows))
    t = trainer.meta["training"]
    if not quiet:
        if t.get("skipped"):
            console.warn(f"{sum(t['skipped'].values())} bad row(s) skipped: "
                         + ", ".join(f"{n} {why}" for why, n in t["skipped"].items()))
        if t.get("unknown_characters") and base:
            console.warn(f"{t['unknown_characters']} character(s) of the data are not in {base}'s vocabulary; "
                         "read as <unk>")
    result = _train_until_done(trainer, quiet)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if _stopped_note(result, f"rnngen classify train --resume --out {out}") or quiet:
        return
    best = result.best_val
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
        lines += [line for line in _read_stdin("the text").splitlines() if line.strip()] if text == "-" else [text]
    if file:
        source = _read_stdin("the text") if file == "-" else resolve_corpus([file], encoding, "strict",
                                                                            what="text file").read()
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
    gen = _load(checkpoint, device)
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
    from .labelled import read_labelled

    gen = _load(checkpoint, device)
    labelled = read_labelled(list(data), min_classes=1, **_read_options(
        text_column, label_column, no_header, fmt, encoding, skip_bad_rows))
    result = gen.evaluate_labelled(labelled, lm_vote)
    if as_json:
        click.echo(json.dumps(result))
        return
    if labelled.skipped:
        console.warn(labelled.skipped_summary())
    console.stdout.print(f"[bold]{', '.join(data)}[/] under {gen.directory}")
    console.stdout.print(console.key_value_table({"examples": result["examples"], "accuracy": result["accuracy"],
                                                  "macro-F1": result["macro_f1"],
                                                  "LM vote (weight)": f"{result['lm_vote']:g}"}), soft_wrap=True)
    console.stdout.print(console.classification_tables(result))


# Commands in modules of their own (they do not import this one).
from .cli_export import export  # noqa: E402
from .cli_inspect import inspect_command  # noqa: E402
from .cli_serve import serve  # noqa: E402

main.add_command(export)
main.add_command(inspect_command, name="inspect")
main.add_command(serve)
