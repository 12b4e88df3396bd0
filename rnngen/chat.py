"""Chat: a conversation with a language model whose recurrent state is carried from turn to turn.

``ChatSession.handle(text)`` takes one input (a line of the conversation or a slash command) and yields
events; the CLI renders them, tests read them. Nothing here prints or touches the terminal.

A turn feeds only its new text, ``{user_prefix} {line}{sep}{bot_prefix}`` (see ``format_input``), in one
recurrent call, then one step per generated token; the conversation is never re-read. Every generated
token is fed, the stop string that ends a reply included, so the state is where the text is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from .config import SampleConfig
from .errors import InputError
from .generate import Cursor, StopScanner, random_stream
from .model import State
from .tokenizers import Tokenizer

DEFAULT_STOP = ("\n\n",)
N = TypeVar("N", int, float)


# ---------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Reply:
    """A piece of the model's reply, as it is generated (stop strings are not shown)."""

    text: str


@dataclass(frozen=True)
class TurnStart:
    """The user's text has been read; the reply follows."""


@dataclass(frozen=True)
class TurnEnd:
    """The reply ended: ``reason`` is "stop" (a stop string), "length" (--length tokens) or "interrupted"."""

    reason: str


@dataclass(frozen=True)
class Info:
    """Output a command asked for (/help, /settings, /history): may span several lines."""

    text: str


@dataclass(frozen=True)
class Notice:
    """A one-line acknowledgement or warning."""

    text: str


@dataclass(frozen=True)
class Problem:
    """A one-line complaint about a command or value; the session goes on unchanged."""

    text: str


@dataclass(frozen=True)
class Quit:
    """The user asked to leave."""


Event = Reply | TurnStart | TurnEnd | Info | Notice | Problem | Quit


@dataclass(frozen=True)
class Turn:
    """One exchange: what the user typed, what the model read for it, and what it wrote back."""

    user: str
    fed: str  # the text fed for the user's side: prefixes and separators included
    reply: str  # the reply as shown (without the stop string)
    generated: str  # everything the model generated and read, the stop string that ended it included
    ended: str  # "stop", "length" or "interrupted"


HELP = """\
Type a line and the model continues the conversation. Commands:
  /temp F        sampling temperature (> 0)          /top-k N | off   sample from the N likeliest
  /top-p F | off nucleus sampling, F in (0, 1]       /len N           tokens per reply at most
  /stop S        end replies at S (\\n, \\t allowed); /stop alone: no stop string, replies run to /len
  /seed N        restart the random stream           /settings        show the settings
  /undo          forget the last turn                /reset           start a fresh conversation
  /history       the turns so far                    /save FILE       write the conversation to FILE
  /label L       condition on a label (labelled models)
  /classify [T]  classify T or the conversation (models with a classification head)
  /help          this text                           /quit            leave (or Ctrl-D)
A line starting with // sends the rest with one /, e.g. //x sends /x.
Multi-line input: paste it, or type \"\"\" on a line of its own, the lines, then \"\"\" again."""


def unescape(text: str) -> str:
    """Let users type \\n and \\t in stop strings and prefixes."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def state_dir() -> Path:
    """Where chat keeps its input history: $RNNGEN_STATE_DIR, else $XDG_STATE_HOME/rnngen, else
    ~/.local/state/rnngen."""
    if override := os.environ.get("RNNGEN_STATE_DIR"):
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rnngen"


class MultiLine:
    """Joins the lines typed between two lines of three double quotes into one input."""

    MARK = '"""'

    def __init__(self) -> None:
        self.lines: list[str] | None = None

    @property
    def active(self) -> bool:
        return self.lines is not None

    def push(self, line: str) -> str | None:
        """The complete input once there is one, else None (still collecting)."""
        if line.strip() == self.MARK:
            if self.lines is None:
                self.lines = []
                return None
            text, self.lines = "\n".join(self.lines), None
            return text
        if self.lines is not None:
            self.lines.append(line)
            return None
        return line

    def cancel(self) -> None:
        self.lines = None


# --------------------------------------------------------------------------------------------- session
class ChatModel(Protocol):
    """What a conversation needs of its model: a sampler (generate.Sampler) that also knows its checkpoint
    and classifies; ``rnngen.load`` returns one (loaded.LoadedModel)."""

    tokenizer: Tokenizer
    device: torch.device
    directory: Path

    @property
    def labels(self) -> list[str]: ...

    @property
    def classes(self) -> list[str]: ...

    def unknown_characters(self, text: str) -> int: ...

    def start(self, prompt: str = "", label: str | None = None, guidance: float = 1.0,
              progress: Callable[[int, int], None] | None = None) -> Cursor: ...

    def feed(self, ids: list[int], state: State | None = None,
             progress: Callable[[int, int], None] | None = None) -> Cursor: ...

    def continue_from(self, cursor: Cursor, config: SampleConfig,
                      generator: torch.Generator | None = None) -> Iterator[str]: ...

    def classify(self, texts: list[str], top: int | None = None,
                 lm_vote: float | None = None) -> list[dict[str, Any]]: ...


class ChatSession:
    """A conversation with one model: the recurrent state, the settings, the turns and an undo stack."""

    def __init__(self, model: ChatModel, config: SampleConfig | None = None, user_prefix: str = "",
                 bot_prefix: str = "", primer: str = "", progress: Callable[[int, int], None] | None = None,
                 start: Cursor | None = None) -> None:
        """``primer``: text read before the conversation (a scene, earlier dialogue, a saved conversation);
        ``progress(done, total)`` follows its reading (see ``Sampler.feed``). ``start``: the cursor after the
        primer, when the caller has read it already (a server reads it between the steps of other streams)."""
        self.gen = model
        self.config = config if config is not None else SampleConfig(length=300, stop=DEFAULT_STOP)
        self.user_prefix, self.bot_prefix = user_prefix, bot_prefix
        self.rng = random_stream(self.config.seed, model.device)
        self.turns: list[Turn] = []
        # Before each turn: the cursor then and how many turns there were. Cursors are copied because
        # continue_from advances a cursor in place; the tensors they hold are never modified in place
        # (each step makes new ones), so keeping references is an exact snapshot.
        self.undo_stack: list[tuple[Cursor, int]] = []
        # Read once; /reset comes back here. With no primer: as at the start of a paragraph, like
        # `rnngen sample` with no prompt.
        self.primer = primer
        self.start_cursor = start if start is not None else self.gen.start(primer, progress=progress)
        self.cursor = self.start_cursor.copy()

    # -- the conversation -------------------------------------------------------------------------
    @property
    def separator(self) -> str:
        """What ends the user's side of a turn before the bot's prefix: the first stop string (the way
        the bot's replies end), or a newline when there is none."""
        return self.config.stop[0] if self.config.stop else "\n"

    def format_input(self, line: str) -> str:
        """The text fed for the user's ``line``.

        ``{user_prefix} {line}`` (no space when the prefix ends in whitespace, e.g. "ROMEO:\\n"), then, when
        there is a bot prefix, the separator and the bot prefix verbatim; with no bot prefix the model simply
        continues the line. In dialogue mode a previous reply that did not end on a stop string (cut by
        /len or Ctrl-C) is closed with the separator first.
        """
        text = line
        if self.user_prefix:
            space = "" if self.user_prefix[-1].isspace() else " "
            text = f"{self.user_prefix}{space}{line}"
        if self.bot_prefix:
            text = f"{text}{self.separator}{self.bot_prefix}"
            if self.turns and self.turns[-1].ended != "stop":
                text = self.separator + text
        return text

    def context(self) -> str:
        """The conversation as the model read it, after the primer (or the initial paragraph start)."""
        return "".join(t.fed + t.generated for t in self.turns)

    def snapshot(self) -> Cursor:
        """A copy of the current cursor (the recurrent state and the next-token logits)."""
        return self.cursor.copy()

    def say(self, line: str) -> str:
        """The model's reply to ``line`` (a line of the conversation, never a command), as one string."""
        return "".join(e.text for e in self.turn(line) if isinstance(e, Reply))

    def handle(self, text: str) -> Iterator[Event]:
        """Events answering one input: a slash command, or a line of the conversation."""
        if text.startswith("/") and not text.startswith("//") and "\n" not in text:
            yield from self.command(text)
        elif text.strip():
            yield from self.turn(text[1:] if text.startswith("//") else text)

    def turn(self, line: str) -> Iterator[Event]:
        """Feed ``line`` (formatted) and stream the reply until a stop string, /len tokens or close()."""
        fed = self.format_input(line)
        ids = [int(i) for i in self.gen.tokenizer.encode(fed)]
        unknown = self.gen.unknown_characters(fed)
        if unknown:
            yield Notice(f"{unknown} character(s) not in the model's vocabulary; read as <unk>")
        before = self.snapshot()
        # The session changes only once the turn ends (record_turn): an interrupt while reading leaves it as it was.
        cursor = self.gen.feed(ids, before.state) if ids else self.snapshot()
        shown: list[str] = []
        generated: list[str] = []
        ended = "interrupted"
        last_good = cursor.copy()
        # continue_from runs without stop strings and this scanner ends the reply instead: the cursor
        # has then read exactly the tokens up to the end of the stop string, and we know why it ended.
        scanner = StopScanner(self.config.stop)
        pieces = self.gen.continue_from(cursor, replace(self.config, stop=()), self.rng)
        try:
            yield TurnStart()
            for piece in pieces:
                generated.append(piece)
                last_good = cursor.copy()
                out, stopped = scanner.push(piece)
                if out:
                    shown.append(out)
                    yield Reply(out)
                if stopped:
                    ended = "stop"
                    break
            else:
                ended = "length"
                if rest := scanner.flush():
                    shown.append(rest)
                    yield Reply(rest)
        except BaseException:
            # Interrupted inside a generation step (e.g. Ctrl-C): the cursor may be half updated, so go
            # back to the last whole token. GeneratorExit (close() at a yield) needs no repair, but the
            # snapshot taken at that yield is the same cursor anyway.
            cursor = last_good
            raise
        finally:
            pieces.close()  # type: ignore[attr-defined]  # a generator, typed as an Iterator
            self.record_turn(before, cursor, Turn(line, fed, "".join(shown), "".join(generated), ended))
        yield TurnEnd(ended)

    def record_turn(self, before: Cursor, after: Cursor, turn: Turn) -> None:
        """Keep ``turn``, which took the conversation from ``before`` to ``after`` (/undo goes back to
        ``before``): what ``turn`` does at the end of a reply, for a reply generated elsewhere (a server's batch)."""
        self.undo_stack.append((before, len(self.turns)))
        self.cursor = after
        self.turns.append(turn)

    # -- commands ---------------------------------------------------------------------------------
    def command(self, text: str) -> Iterator[Event]:
        name, _, arg = text[1:].partition(" ")
        handler = COMMANDS.get(name.lower())
        if handler is None:
            yield Problem(f"unknown command /{name}; /help lists the commands")
            return
        try:
            yield from handler(self, arg)
        except InputError as exc:  # a value SampleConfig (or a command) refused: nothing was changed
            yield Problem(str(exc))

    def _set(self, **changes: Any) -> None:
        self.config = replace(self.config, **changes)

    def cmd_temp(self, arg: str) -> Iterator[Event]:
        self._set(temperature=_number(arg, float, "/temp F, e.g. /temp 0.7"))
        yield Notice(f"temperature {self.config.temperature:g}")

    def cmd_top_k(self, arg: str) -> Iterator[Event]:
        off = arg.strip().lower() in ("off", "none")
        self._set(top_k=None if off else _number(arg, int, "/top-k N, or /top-k off"))
        yield Notice(f"top-k {self.config.top_k or 'off'}")

    def cmd_top_p(self, arg: str) -> Iterator[Event]:
        off = arg.strip().lower() in ("off", "none")
        self._set(top_p=None if off else _number(arg, float, "/top-p F with F in (0, 1], or /top-p off"))
        yield Notice(f"top-p {'off' if self.config.top_p is None else f'{self.config.top_p:g}'}")

    def cmd_len(self, arg: str) -> Iterator[Event]:
        self._set(length=_number(arg, int, "/len N, e.g. /len 200"))
        yield Notice(f"replies of at most {self.config.length} tokens")

    def cmd_stop(self, arg: str) -> Iterator[Event]:
        # Everything after "/stop " is the stop string, spaces included.
        self._set(stop=(unescape(arg),) if arg else ())
        yield Notice(f"stop at {arg!r}" if arg else "no stop string: replies run to /len")

    def cmd_seed(self, arg: str) -> Iterator[Event]:
        seed = _number(arg, int, "/seed N, e.g. /seed 7")
        self._set(seed=seed)
        self.rng = random_stream(seed, self.gen.device)
        yield Notice(f"seed {seed}: the random stream starts again")

    def cmd_label(self, arg: str) -> Iterator[Event]:
        labels = self.gen.labels
        if not labels:
            yield Problem("this model has no labels (train one on labelled data: rnngen classify train)")
        elif not arg.strip():
            yield Info(f"labels: {', '.join(labels)}")
        elif arg.strip() not in labels:
            yield Problem(f"unknown label {arg.strip()!r}: use one of {', '.join(labels)}")
        else:
            # A label token begins a labelled example, so the conversation starts again from it.
            self.cursor, self.turns, self.undo_stack = self.gen.start(self.primer, label=arg.strip()), [], []
            yield Notice(f"a fresh conversation for label {arg.strip()!r}")

    def cmd_classify(self, arg: str) -> Iterator[Event]:
        if not self.gen.classes:
            yield Problem("this model has no classification head (add one: rnngen classify train DATA --from CKPT)")
            return
        text = unescape(arg.strip()) or self.context()
        if not text.strip():
            yield Problem("nothing to classify: /classify TEXT, or after a turn for the conversation so far")
            return
        result = self.gen.classify([text], top=3)[0]
        ranked = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in result["top"])
        yield Info(f"{result['label']}  ({ranked})")

    def cmd_reset(self, arg: str) -> Iterator[Event]:
        self.cursor, self.turns, self.undo_stack = self.start_cursor.copy(), [], []
        yield Notice("a fresh conversation (settings kept)" + (", after the context" if self.primer else ""))

    def cmd_undo(self, arg: str) -> Iterator[Event]:
        if not self.undo_stack:
            yield Problem("nothing to undo")
            return
        cursor, count = self.undo_stack.pop()
        self.cursor = cursor.copy()
        dropped = self.turns[count:]
        del self.turns[count:]
        yield Notice(f"forgot: {_preview(dropped[0].user) if dropped else '(nothing)'}")

    def cmd_history(self, arg: str) -> Iterator[Event]:
        if not self.turns:
            yield Info("(no turns yet)")
            return
        lines = []
        for i, t in enumerate(self.turns, 1):
            mark = {"stop": "", "length": "  [cut at /len]", "interrupted": "  [interrupted]"}[t.ended]
            lines.append(f"[{i}] > {t.user}")
            lines.append("    " + t.reply.replace("\n", "\n    ") + mark)
        yield Info("\n".join(lines))

    def cmd_save(self, arg: str) -> Iterator[Event]:
        if not arg.strip():
            yield Problem("usage: /save FILE")
            return
        path = Path(arg.strip()).expanduser()
        try:
            path.write_text(self.primer + self.context(), encoding="utf-8")  # as read: --context-file resumes it
        except OSError as exc:
            yield Problem(f"cannot write {path}: {exc.strerror}")
            return
        yield Notice(f"wrote {len(self.turns)} turn(s) to {path}")

    def cmd_settings(self, arg: str) -> Iterator[Event]:
        c = self.config
        rows = {
            "temperature": f"{c.temperature:g}", "top-k": c.top_k or "off",
            "top-p": "off" if c.top_p is None else f"{c.top_p:g}", "length": c.length,
            "stop": ", ".join(repr(s) for s in c.stop) or "(none)", "seed": "random" if c.seed is None else c.seed,
            "user prefix": repr(self.user_prefix), "bot prefix": repr(self.bot_prefix),
            "turns": len(self.turns), "model": str(self.gen.directory), "device": self.gen.device.type,
        }
        yield Info("\n".join(f"{k:<12} {v}" for k, v in rows.items()))

    def cmd_help(self, arg: str) -> Iterator[Event]:
        yield Info(HELP)

    def cmd_quit(self, arg: str) -> Iterator[Event]:
        yield Quit()


COMMANDS = {
    "temp": ChatSession.cmd_temp, "temperature": ChatSession.cmd_temp, "top-k": ChatSession.cmd_top_k,
    "top-p": ChatSession.cmd_top_p, "len": ChatSession.cmd_len, "length": ChatSession.cmd_len,
    "stop": ChatSession.cmd_stop, "seed": ChatSession.cmd_seed, "label": ChatSession.cmd_label,
    "classify": ChatSession.cmd_classify, "reset": ChatSession.cmd_reset, "undo": ChatSession.cmd_undo,
    "history": ChatSession.cmd_history, "save": ChatSession.cmd_save, "settings": ChatSession.cmd_settings,
    "help": ChatSession.cmd_help, "quit": ChatSession.cmd_quit, "exit": ChatSession.cmd_quit,
}


def _number(arg: str, kind: type[N], usage: str) -> N:
    value = arg.strip()
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InputError(f"{value!r} is not {what}; usage: {usage}" if value else f"usage: {usage}") from None


def _preview(text: str, width: int = 60) -> str:
    flat = text.replace("\n", " ")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


__all__ = ["ChatSession", "MultiLine", "Event", "Reply", "TurnStart", "TurnEnd", "Info", "Notice", "Problem", "Quit",
           "Turn", "state_dir", "unescape", "DEFAULT_STOP"]
