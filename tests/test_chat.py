"""`rnngen chat`: the session object driven directly, then the installed command in a pseudo-terminal and
with piped input."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import termios
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rnngen
from conftest import rnngen_command, run_cli
from rnngen.chat import (ChatSession, Info, MultiLine, Notice, Problem, Quit, Reply, TurnEnd, TurnStart,
                         state_dir)
from rnngen.checkpoint import save_checkpoint
from rnngen.config import ModelConfig, SampleConfig
from rnngen.generate import Cursor
from rnngen.loaded import LoadedModel
from rnngen.model import RNNModel
from rnngen.tokenizers import CharTokenizer

VOCAB = "abcdefghijklmnopqrstuvwxyz .,:/\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with sharp logits (near-ties unlikely), saved like a real checkpoint."""
    tok = CharTokenizer.fit([VOCAB])
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=32, emb_dim=16, layers=2))
    with torch.no_grad():
        model.lm_head.proj.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("chat") / "ck"
    save_checkpoint(path, model, tok, {})
    return path


@pytest.fixture
def gen(checkpoint: Path) -> LoadedModel:
    return rnngen.load(str(checkpoint))


def config(**changes: object) -> SampleConfig:
    return replace(SampleConfig(length=30, stop=("\n\n",), seed=0), **changes)


def reply(session: ChatSession, text: str) -> str:
    return "".join(e.text for e in session.handle(text) if isinstance(e, Reply))


def events(session: ChatSession, text: str) -> list[object]:
    return list(session.handle(text))


def copy(cursor: Cursor) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [s.clone() for s in cursor.state or ()], cursor.logits.clone()


def assert_same(cursor: Cursor, saved: tuple[list[torch.Tensor], torch.Tensor]) -> None:
    state, logits = saved
    assert len(cursor.state or ()) == len(state)
    assert all(torch.equal(a, b) for a, b in zip(cursor.state or (), state))
    assert torch.equal(cursor.logits, logits)


def greedy_after(gen: LoadedModel, cursor: Cursor, text: str, length: int, stop: tuple[str, ...]) -> str:
    """What LoadedModel's greedy sampling writes after ``text``, read from ``cursor``."""
    start = gen.feed([int(i) for i in gen.tokenizer.encode(text)], cursor.state)
    return "".join(gen.continue_from(start, SampleConfig(greedy=True, length=length, stop=stop)))


# ------------------------------------------------------------------------------------- the session
def test_a_turn_costs_only_its_new_tokens(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=25, stop=()), user_prefix="a:", bot_prefix="b:")
    lengths: list[int] = []
    gen.fast = False  # count the plain path's model calls (test_fastpath.py counts the fast steps)
    hook = gen.model.encoder.rnn.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    try:
        for i, text in enumerate(["hello there", "and again", "x", "a much longer line than the others"]):
            lengths.clear()
            fed = session.format_input(text)
            reply(session, text)
            # the new text in one call, then one step per generated token: never the conversation so far
            assert lengths == [len(fed)] + [1] * 25, i
    finally:
        hook.remove()
    assert len(session.context()) > 4 * 25


def test_undo_restores_the_exact_state(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=40))
    fresh = copy(session.cursor)
    first = reply(session, "the cat")
    after_first = copy(session.cursor)
    reply(session, "sat on")
    reply(session, "the mat")
    assert len(session.turns) == 3
    assert any(isinstance(e, Notice) and "sat on" not in e.text and "the mat" in e.text
               for e in events(session, "/undo"))
    events(session, "/undo")
    assert_same(session.cursor, after_first)
    assert [t.user for t in session.turns] == ["the cat"]
    events(session, "/undo")
    assert_same(session.cursor, fresh)
    assert session.turns == [] and session.context() == ""
    assert [type(e) for e in events(session, "/undo")] == [Problem]  # nothing left to undo
    assert first  # the turns were real replies


def test_undo_then_same_line_gives_same_greedy_reply(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(greedy=True, length=40))
    reply(session, "one")
    before = copy(session.cursor)
    original = reply(session, "two")
    after = copy(session.cursor)
    events(session, "/undo")
    assert_same(session.cursor, before)
    assert reply(session, "two") == original
    assert_same(session.cursor, after)


def test_low_temperature_gives_the_greedy_continuation(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=60, stop=()))
    assert [type(e) for e in events(session, "/temp 0.0001")] == [Notice]
    assert session.config.temperature == 0.0001
    start = Cursor(session.cursor.state, session.cursor.logits)
    got = reply(session, "hello there")
    assert got == greedy_after(gen, start, "hello there", 60, ())
    # from the very beginning too, as `LoadedModel.sample(..., greedy=True)` reads it
    assert got == gen.sample("\nhello there", greedy=True, length=60)
    second_start = Cursor(session.cursor.state, session.cursor.logits)
    assert reply(session, "more") == greedy_after(gen, second_start, "more", 60, ())


def test_stop_string_ends_the_reply_and_is_read(gen: LoadedModel) -> None:
    full = gen.sample("\nabc", greedy=True, length=200)
    stop = full[30:32]
    session = ChatSession(gen, config(greedy=True, length=200, stop=(stop,)))
    lengths: list[int] = []
    gen.fast = False  # count the plain path's model calls (test_fastpath.py counts the fast steps)
    hook = gen.model.encoder.rnn.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    try:
        seen = events(session, "abc")
    finally:
        hook.remove()
    cut = full[: full.index(stop)]
    assert "".join(e.text for e in seen if isinstance(e, Reply)) == cut
    assert isinstance(seen[0], TurnStart) and seen[-1] == TurnEnd("stop")
    turn = session.turns[-1]
    assert turn.reply == cut and turn.generated == cut + stop and turn.ended == "stop"
    assert lengths == [3] + [1] * len(cut + stop)  # the stop string's tokens are read: the state is there


def test_saved_transcript_is_what_the_model_read(gen: LoadedModel, tmp_path: Path) -> None:
    session = ChatSession(gen, config(length=30), user_prefix="a:", bot_prefix="b:\n")
    for text in ("hi there", "what now", "bye"):
        reply(session, text)
    out = tmp_path / "talk.txt"
    assert [type(e) for e in events(session, f"/save {out}")] == [Notice]
    saved = out.read_text(encoding="utf-8")
    assert saved == session.context() and saved.startswith("a: hi there\n\nb:\n")
    # reading the saved text in one go reaches the session's state: every token, the last one included
    whole = gen.feed([int(i) for i in gen.tokenizer.encode("\n" + saved)])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole.state, session.cursor.state))
    assert torch.allclose(whole.logits, session.cursor.logits, atol=1e-4)
    assert [type(e) for e in events(session, f"/save {tmp_path}/no/such/dir/x.txt")] == [Problem]
    assert [type(e) for e in events(session, "/save")] == [Problem]


def test_dialogue_format(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=5, stop=("\n\n",)), user_prefix="ROMEO:", bot_prefix="JULIET:")
    assert session.format_input("hi") == "ROMEO: hi\n\nJULIET:"
    reply(session, "hi")
    assert session.turns[-1].ended == "length"
    # the cut reply is closed with the separator before the next line, so the turns stay apart
    assert session.format_input("yo") == "\n\nROMEO: yo\n\nJULIET:"
    events(session, "/stop")
    assert session.format_input("yo") == "\nROMEO: yo\nJULIET:"  # no stop string: a newline
    play = ChatSession(gen, config(), user_prefix="ROMEO:\n", bot_prefix="JULIET:\n")
    assert play.format_input("hi") == "ROMEO:\nhi\n\nJULIET:\n"
    assert ChatSession(gen, config()).format_input("just text") == "just text"  # no prefixes: continue it


def test_settings_commands_take_effect(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(stop=()))
    for command, field, value in [("/temp 0.5", "temperature", 0.5), ("/top-k 5", "top_k", 5),
                                  ("/top-k off", "top_k", None), ("/top-p 0.9", "top_p", 0.9),
                                  ("/top-p off", "top_p", None), ("/len 7", "length", 7),
                                  ("/stop xyz", "stop", ("xyz",)), ("/stop \\n", "stop", ("\n",)),
                                  ("/stop  two words", "stop", (" two words",)), ("/stop", "stop", ()),
                                  ("/seed 3", "seed", 3)]:
        got = events(session, command)
        assert [type(e) for e in got] == [Notice], command
        assert getattr(session.config, field) == value, command
    lengths: list[int] = []
    gen.fast = False  # count the plain path's model calls (test_fastpath.py counts the fast steps)
    hook = gen.model.encoder.rnn.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    try:
        reply(session, "abc")
    finally:
        hook.remove()
    assert lengths == [3] + [1] * 7  # /len 7 with no stop string: exactly seven tokens
    settings = "".join(e.text for e in events(session, "/settings") if isinstance(e, Info))
    assert re.search(r"temperature\s+0.5", settings) and re.search(r"length\s+7", settings)


def test_seed_restarts_the_random_stream(gen: LoadedModel) -> None:
    a, b = ChatSession(gen, config(seed=None)), ChatSession(gen, config(seed=None))
    events(a, "/seed 11")
    events(b, "/seed 11")
    first = reply(a, "the")
    assert first == reply(b, "the")
    events(a, "/reset")
    events(a, "/seed 11")
    assert reply(a, "the") == first


@pytest.mark.parametrize("command", ["/temp 0", "/temp abc", "/temp", "/temp nan", "/top-p 2", "/top-p 0",
                                     "/top-k 0", "/top-k x", "/len -1", "/len", "/seed x", "/nosuch", "/",
                                     "/label happy", "/classify", "/classify some text"])
def test_bad_commands_get_one_line_and_change_nothing(gen: LoadedModel, command: str) -> None:
    session = ChatSession(gen, config())
    before, saved = session.config, copy(session.cursor)
    got = events(session, command)
    assert [type(e) for e in got] == [Problem] and "\n" not in got[0].text and got[0].text
    assert session.config == before and session.turns == []
    assert_same(session.cursor, saved)


def test_label_and_classify_hooks(gen: LoadedModel) -> None:
    session = ChatSession(gen, config())  # a plain language model: both say how to get what they need
    (problem,) = events(session, "/label happy")
    assert isinstance(problem, Problem) and "no labels" in problem.text and "classify train" in problem.text
    (problem,) = events(session, "/classify some text")
    assert isinstance(problem, Problem) and "no classification head" in problem.text
    # (test_classify.py covers both on a model that has labels and a classifier)


def test_reset_history_help_quit_and_slashes(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=10))
    fresh = copy(session.cursor)
    reply(session, "abc")
    reply(session, "//x")  # a literal slash: a turn, not a command
    assert [t.user for t in session.turns] == ["abc", "/x"]
    history = "".join(e.text for e in events(session, "/history") if isinstance(e, Info))
    assert "[1] > abc" in history and "[2] > /x" in history
    assert [type(e) for e in events(session, "/reset")] == [Notice]
    assert session.turns == [] and session.undo_stack == []
    assert_same(session.cursor, fresh)
    assert "(no turns yet)" in events(session, "/history")[0].text
    help_text = events(session, "/help")[0].text
    for name in ("/temp", "/top-k", "/top-p", "/len", "/stop", "/seed", "/label", "/classify", "/reset", "/undo",
                 "/history", "/save", "/settings", "/help", "/quit", "//", '"""'):
        assert name in help_text, name
    assert events(session, "/quit") == [Quit()]
    assert events(session, "   ") == []  # a blank line sends nothing


def test_closing_mid_reply_keeps_a_consistent_state(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=500, stop=()))
    before = copy(session.cursor)
    stream = session.handle("abc")
    shown = ""
    for event in stream:
        if isinstance(event, Reply):
            shown += event.text
            if len(shown) >= 5:
                break
    stream.close()  # what the CLI does on Ctrl-C
    turn = session.turns[-1]
    assert turn.ended == "interrupted" and turn.reply == shown == turn.generated
    redo = gen.feed([int(i) for i in gen.tokenizer.encode("abc" + shown)], before_cursor(before).state)
    assert torch.allclose(redo.logits, session.cursor.logits, atol=1e-4)
    events(session, "/undo")
    assert_same(session.cursor, before)


def before_cursor(saved: tuple[list[torch.Tensor], torch.Tensor]) -> Cursor:
    return Cursor(tuple(saved[0]), saved[1])


def test_unknown_characters_warn(gen: LoadedModel) -> None:
    got = events(ChatSession(gen, config(length=3)), "héllo")
    assert isinstance(got[0], Notice) and "1 character" in got[0].text


def test_multiline_joiner() -> None:
    joiner = MultiLine()
    assert joiner.push("plain") == "plain"
    assert joiner.push('"""') is None and joiner.active
    assert joiner.push("first") is None and joiner.push("") is None and joiner.push("/temp 1") is None
    assert joiner.push('"""') == "first\n\n/temp 1" and not joiner.active


def test_multiline_input_is_text_even_if_it_starts_with_a_slash(gen: LoadedModel) -> None:
    session = ChatSession(gen, config(length=3))
    events(session, "/temp 1\nabc")
    assert session.config.temperature == config().temperature and session.turns[-1].user == "/temp 1\nabc"


def test_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RNNGEN_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "rnngen"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / ".local" / "state" / "rnngen"
    monkeypatch.setenv("RNNGEN_STATE_DIR", str(tmp_path / "override"))
    assert state_dir() == tmp_path / "override"


# ---------------------------------------------------------------------------------- the command
def test_context_is_read_first_and_resumes_a_saved_conversation(gen: LoadedModel, tmp_path: Path) -> None:
    """A primer (--context-file) is read before the first turn; /reset comes back to it, and a conversation
    written by /save, given as the context of a new session, carries on from the state it ended in."""
    primer = "a: the scene\n\nb:\nis set\n\n"
    session = ChatSession(gen, config(length=30), user_prefix="a:", bot_prefix="b:\n", primer=primer)
    start = copy(session.cursor)
    expected = gen.start(primer)
    assert all(torch.equal(a, b) for a, b in zip(start[0], expected.state)) and torch.equal(start[1], expected.logits)
    first = [reply(session, text) for text in ("hi there", "what now")]
    out = tmp_path / "talk.txt"
    events(session, f"/save {out}")
    assert out.read_text(encoding="utf-8") == primer + session.context()
    resumed = ChatSession(gen, config(length=30, greedy=True), user_prefix="a:", bot_prefix="b:\n",
                          primer=out.read_text(encoding="utf-8"))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(resumed.cursor.state, session.cursor.state))
    session.config = replace(session.config, greedy=True)
    assert reply(resumed, "and then") == reply(session, "and then")  # the same place, the same greedy reply
    assert [type(e) for e in events(session, "/reset")] == [Notice]
    assert_same(session.cursor, start)
    session.config = replace(session.config, greedy=False)
    session.rng.manual_seed(0)
    assert reply(session, "hi there") == first[0]  # after /reset: where the first turn started


def test_a_server_reads_the_context_and_records_turns_through_the_public_hooks(gen: LoadedModel) -> None:
    """``start=`` (a context read by the caller) and ``record_turn`` (a reply generated elsewhere, as by the server's
    batch) leave a session as ``ChatSession.turn`` does, and /undo goes back over them."""
    primer = "a: the scene\n\n"
    plain = ChatSession(gen, config(length=30), user_prefix="a:", bot_prefix="b:", primer=primer)
    hooked = ChatSession(gen, config(length=30), user_prefix="a:", bot_prefix="b:", primer=primer,
                         start=gen.start(primer))
    assert_same(hooked.cursor, copy(plain.cursor))
    before = hooked.snapshot()
    reply(plain, "hi there")
    hooked.record_turn(before, plain.snapshot(), plain.turns[-1])
    assert hooked.turns == plain.turns and hooked.context() == plain.context()
    assert_same(hooked.cursor, copy(plain.cursor))
    assert [type(e) for e in events(hooked, "/undo")] == [Notice]
    assert hooked.turns == [] and torch.equal(hooked.cursor.logits, before.logits)


def test_python_api_chat(gen: LoadedModel) -> None:
    """LoadedModel.chat: a session whose say() returns each reply, as the CLI's session writes it."""
    session = gen.chat(user_prefix="a:", bot_prefix="b:\n", context="the scene\n", length=30, seed=3)
    same = ChatSession(gen, SampleConfig(length=30, stop=("\n\n",), seed=3), "a:", "b:\n", "the scene\n")
    for line in ("hi there", "what now"):
        assert session.say(line) == reply(same, line)
    assert [t.user for t in session.turns] == ["hi there", "what now"]


def test_piped_input_gives_plain_text(checkpoint: Path, gen: LoadedModel) -> None:
    lines = ["hello", "/temp abc", "/len 12", "//x", '"""', "two", "lines", '"""', "/quit", "never sent"]
    proc = run_cli("chat", str(checkpoint), "--seed", "4", "--length", "20", "--stop", "zz",
                   input="\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stdout  # plain text: no escapes
    assert "'abc' is not a number" in proc.stderr
    # the same inputs through the session in this process: the command writes each reply and a newline
    session = ChatSession(gen, SampleConfig(length=20, stop=("zz",), seed=4))
    expected = ""
    for text in ["hello", "/temp abc", "/len 12", "//x", "two\nlines"]:
        got = list(session.handle(text))
        if any(isinstance(e, TurnStart) for e in got):
            expected += "".join(e.text for e in got if isinstance(e, Reply)) + "\n"
    assert proc.stdout == expected
    assert [t.user for t in session.turns] == ["hello", "/x", "two\nlines"]


def test_bad_options_one_line(checkpoint: Path, tmp_path: Path) -> None:
    for args in (["--temperature", "0"], ["--top-p", "2"], ["--stop", ""]):
        proc = run_cli("chat", str(checkpoint), *args, input="", timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, args
    proc = run_cli("chat", str(tmp_path / "missing"), input="", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for context, phrase in ((tmp_path / "none.txt", "context file not found"), ("-", "cannot come from stdin")):
        proc = run_cli("chat", str(checkpoint), "--context-file", str(context), input="", timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and phrase in proc.stderr, proc.stderr
    (tmp_path / "scene.txt").write_text("the scene\n\n", encoding="utf-8")
    proc = run_cli("chat", str(checkpoint), "--context-file", str(tmp_path / "scene.txt"), "--seed", "1",
                   input="hello\n/save " + str(tmp_path / "out.txt") + "\n", timeout=60)
    assert proc.returncode == 0 and (tmp_path / "out.txt").read_text().startswith("the scene\n\nhello")


ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]|[\r\b]")
# prompt_toolkit turns bracketed paste on each time it shows a prompt: a sure sign of a new prompt
PROMPT = "<prompt>"


class Terminal:
    """The installed `rnngen` in a real pseudo-terminal (its controlling terminal, so Ctrl-C is SIGINT)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        with warnings.catch_warnings():  # fork with threads: the child only calls execve
            warnings.simplefilter("ignore", DeprecationWarning)
            pid, fd = pty.fork()
        if pid == 0:
            try:
                # As a shell starts a foreground job: Ctrl-C's SIGINT not ignored, even when these tests run
                # in a background job of a shell without job control (which ignores SIGINT for it).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
                os.execve(args[0], args, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.raw, self.pos = pid, fd, b"", 0
        self.status: int | None = None

    @property
    def screen(self) -> str:
        """Everything written so far, control sequences removed."""
        return ANSI.sub("", self.raw.decode("utf-8", "replace").replace("\x1b[?2004h", PROMPT))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child has gone and the terminal is closed
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` appears after the previous match; return the screen up to it."""
        deadline = time.monotonic() + timeout
        while (i := self.screen.find(text, self.pos)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                raise AssertionError(f"{text!r} did not appear; the screen ends with {self.screen[-1500:]!r}")
        before, self.pos = self.screen[self.pos:i], i + len(text)
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._read(0.1)
        raise AssertionError(f"still running; the screen ends with {self.screen[-1500:]!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        os.close(self.fd)


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TERM": "xterm-256color", "RNNGEN_STATE_DIR": str(tmp_path / "state"),
            # a test terminal does not answer cursor-position requests; do not wait for the answer
            "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1"}


@pytest.fixture
def spawn(terminal_env: dict[str, str]) -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal([rnngen_command(), "chat", *args], terminal_env)
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()


def test_terminal_session(checkpoint: Path, spawn: Callable[..., Terminal], terminal_env: dict[str, str]) -> None:
    # a stop string that never matches and a long reply, so there is time to press Ctrl-C mid-reply
    term = spawn(str(checkpoint), "--length", "1000000", "--stop", "QQ", "--seed", "1")
    term.expect("Ctrl-D leaves")
    term.expect(PROMPT)
    term.send("hello\r")
    term.expect("hello")
    deadline = time.monotonic() + 30
    while len(term.screen) - term.pos < 200 and time.monotonic() < deadline:  # the reply is streaming
        term._read(0.5)
    assert len(term.screen) - term.pos >= 200, term.screen[-500:]
    term.send("\x03")  # Ctrl-C mid-reply: that reply stops, the REPL goes on
    term.expect("reply stopped")
    term.expect(PROMPT)
    term.send("/len 5\r")
    term.expect("replies of at most 5 tokens")
    term.expect(PROMPT)
    term.send("/temp 0\r")
    term.expect("temperature must be a positive number")
    term.expect(PROMPT)
    term.send("again\r")
    term.expect("again")
    term.expect(PROMPT)
    term.send("typed but dropped\x03")  # Ctrl-C at the prompt clears the line
    term.expect(PROMPT)
    term.send("/history\r")
    history = term.expect(PROMPT)
    assert "[1] > hello" in history and "[interrupted]" in history and "[2] > again" in history
    assert "dropped" not in history.split("/history", 1)[-1]
    term.send("/settings\r")
    settings = term.expect(PROMPT)
    assert re.search(r"length\s+5", settings) and re.search(r"temperature\s+0.8", settings)
    term.send("\x04")  # Ctrl-D leaves
    assert term.wait() == 0
    assert "Traceback" not in term.screen
    saved = (Path(terminal_env["RNNGEN_STATE_DIR"]) / "chat_history").read_text()
    assert "hello" in saved and "/len 5" in saved and "/settings" in saved and "dropped" not in saved

    # the input history persists: in a new session, Up recalls /settings from the last one
    term = spawn(str(checkpoint), "--length", "5")
    term.expect(PROMPT)
    term.send("\x1b[A\r")
    settings = term.expect(PROMPT)
    assert re.search(r"length\s+5", settings) and "(no turns yet)" not in settings
    term.send("/quit\r")
    assert term.wait() == 0 and "Traceback" not in term.screen


def test_terminal_multiline_input(checkpoint: Path, spawn: Callable[..., Terminal]) -> None:
    term = spawn(str(checkpoint), "--length", "3", "--stop", "QQ")
    term.expect(PROMPT)
    term.send('"""\r')
    term.expect(PROMPT)
    term.send("first line\r")
    term.expect(PROMPT)
    term.send('"""\r')
    term.expect(PROMPT)
    term.send("\x1b[200~pasted one\npasted two\x1b[201~\r")  # a bracketed paste of two lines: one input
    term.expect(PROMPT)
    term.send("/history\r")
    history = term.expect(PROMPT)
    assert "[1] > first line" in history and "[2] > pasted one\npasted two" in history.replace("\r", "")
    term.send("\x04")
    assert term.wait() == 0 and "Traceback" not in term.screen
