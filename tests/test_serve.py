"""`rnngen serve`: real server processes on loopback ports, started by the installed command, driven by the
official openai client, httpx and a headless chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install '.[test]')")
openai = pytest.importorskip("openai", reason="the serve tests need the openai client (pip install '.[test]')")
pytest.importorskip("uvicorn", reason="rnngen serve needs uvicorn (pip install '.[serve]')")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="the playground test needs websockets")

from conftest import rnngen_command, run_cli
from test_classify import SMALL, write_csv

KEY = "test-key"
SECRET = "shared-secret"


class Served:
    """A running `rnngen serve` process and its base URL."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:  # a free port (the server binds it right after)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([rnngen_command(), "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"rnngen serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        pytest.fail("rnngen serve did not answer /health within 90 s")

    def metric(self, name: str, model: str = "lm") -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        assert match, text
        return float(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def letters_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier whose texts are made of a/e/o ("vowels") or k/t/s ("consonants"); it also generates by label."""
    root = tmp_path_factory.mktemp("letters")
    rng = random.Random(0)
    rows = [("".join(rng.choice(chars) for _ in range(rng.randint(4, 9))), label)
            for _ in range(300) for chars, label in (("aeo", "vowels"), ("kts", "consonants"))]
    run = root / "run"
    proc = run_cli("classify", "train", str(write_csv(root / "letters.csv", rows)), "--out", str(run), *SMALL,
                   "--max-epochs", "8", "--lr", "5e-3", "--lm-weight", "1.0", "-q")
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def server(tiny_run: Path, letters_run: Path) -> Iterator[Served]:
    served = Served([f"lm={tiny_run}", f"letters={letters_run}", "--api-key", KEY, "--secret", SECRET,
                     "--max-tokens", "100000", "--max-request-bytes", "20000", "--bot-prefix", "lm=Bot:",
                     "--cors-origin", "http://example.org"])
    yield served
    served.stop()


@pytest.fixture(scope="module")
def small_server(tiny_run: Path) -> Iterator[Served]:
    """One stream at a time, no queue, the same secret as ``server``, sessions that expire after 1 s."""
    served = Served([f"lm={tiny_run}", "--max-streams", "1", "--max-queue", "0", "--max-tokens", "100000",
                     "--session-ttl", "1"], env={"RNNGEN_SERVE_SECRET": SECRET})
    yield served
    served.stop()


@pytest.fixture(scope="module")
def hasty_server(tiny_run: Path, letters_run: Path) -> Iterator[Served]:
    """A time limit of a microsecond: every request's model work runs past it."""
    served = Served([f"lm={tiny_run}", f"letters={letters_run}", "--timeout", "1e-6"])
    yield served
    served.stop()


@pytest.fixture(scope="module")
def roomy_server(tiny_run: Path) -> Iterator[Served]:
    """Requests of up to 2 MB: prompts of 100k characters."""
    served = Served([f"lm={tiny_run}", "--max-request-bytes", "2000000", "--max-tokens", "100000"])
    yield served
    served.stop()


def client(server: Served, **options: Any) -> httpx.Client:
    return httpx.Client(**{"base_url": server.url, "headers": {"Authorization": f"Bearer {KEY}"}, "timeout": 60,
                           **options})


def assert_no_stream_left(server: Served) -> None:
    """Within 5 s no stream is active, and then no step is spent any more."""
    deadline = time.monotonic() + 5
    while server.metric("rnngen_active_streams") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("rnngen_active_streams") == 0
    steps = server.metric("rnngen_model_steps_total")
    time.sleep(0.5)
    assert server.metric("rnngen_model_steps_total") == steps


def events(response: httpx.Response) -> list[Any]:
    """The SSE events of a response, checking the framing: "data: ..." lines, each followed by a blank line."""
    raw = response.read().decode()
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), raw[:500]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[6:]) for b in blocks[:-1]]


def sampled(run: Path, prompt: str, n: int, seed: int, temperature: float) -> str:
    """What `rnngen sample` writes after the prompt (it prints the prompt first and a newline last)."""
    proc = run_cli("sample", str(run), "--prompt", prompt, "-n", str(n), "--seed", str(seed), "-t", str(temperature))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt) and proc.stdout.endswith("\n")
    return proc.stdout[len(prompt):-1]


# ------------------------------------------------------------------------------------------ the OpenAI API
def test_the_openai_client_works_unchanged_and_a_seed_gives_rnngen_samples_text(server: Served,
                                                                             tiny_run: Path) -> None:
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert {m.id for m in api.models.list().data} == {"lm", "letters"}
    done = api.completions.create(model="lm", prompt="The ", max_tokens=100, seed=3, temperature=0.8)
    assert done.choices[0].text == sampled(tiny_run, "The ", 100, 3, 0.8)
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (4, 100, 104)
    streamed = api.completions.create(model="lm", prompt="The ", max_tokens=100, seed=3, temperature=0.8,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    # Stop strings end the text before them; n choices are independent (choice i: seed + i).
    two = api.completions.create(model="lm", prompt="The ", max_tokens=300, seed=3, stop=["e"], n=2)
    assert [c.finish_reason for c in two.choices] == ["stop", "stop"]
    assert all("e" not in c.text for c in two.choices)
    assert two.choices[0].text == done.choices[0].text.split("e")[0]
    chat = api.chat.completions.create(model="lm", messages=[{"role": "user", "content": "Hello"}], max_tokens=50,
                                       seed=1)
    assert chat.choices[0].message.role == "assistant" and "\n\n" not in chat.choices[0].message.content
    pieces = api.chat.completions.create(model="lm", messages=[{"role": "user", "content": "Hello"}],
                                         max_tokens=50, seed=1, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model="lm", prompt="x", max_tokens=100_001)


def test_server_sent_events_come_in_order_and_end_with_done(server: Served) -> None:
    with client(server) as http:
        body = {"model": "lm", "prompt": "The ", "max_tokens": 30, "seed": 5, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            got = events(response)
        *chunks, finish, usage = got
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        assert finish["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 30
        whole = http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "lm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}) as r:
            chat = events(r)
        assert chat[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chat[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_chat_format_uses_the_models_prefixes() -> None:
    from rnngen.serve import chat_text

    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert chat_text(messages, "ROMEO:", "JULIET:", "\n\n") == (
        "A play.\n\nROMEO: Hi\n\nJULIET:Hello\n\nROMEO: Bye\n\nJULIET:")


# ------------------------------------------------------------------------------------------- native endpoints
def test_top_k_label_guidance_classify_and_score(server: Served) -> None:
    with client(server) as http:
        for label, allowed in (("vowels", set("aeo")), ("consonants", set("kts"))):
            r = http.post("/v1/rnngen/generate", json={"model": "letters", "label": label, "temperature": 0,
                                                       "max_tokens": 30, "guidance": 1.5})
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text and set(text) <= allowed, text
        greedy = http.post("/v1/completions", json={"model": "lm", "prompt": "The ", "temperature": 0,
                                                    "max_tokens": 40}).json()["choices"][0]["text"]
        top1 = http.post("/v1/completions", json={"model": "lm", "prompt": "The ", "top_k": 1, "seed": 9,
                                                  "max_tokens": 40}).json()["choices"][0]["text"]
        assert top1 == greedy  # top-k 1 is greedy, whatever the seed
        r = http.post("/v1/rnngen/generate", json={"model": "letters", "label": "nonsense"})
        assert r.status_code == 400 and "unknown label" in r.json()["error"]["message"]
        r = http.post("/v1/rnngen/classify", json={"model": "letters", "input": ["aoeeao", "tsktk"], "top": 2})
        results = r.json()["results"]
        assert [x["label"] for x in results] == ["vowels", "consonants"]
        assert all(abs(sum(t["probability"] for t in x["top"]) - 1) < 1e-4 for x in results)
        r = http.post("/v1/rnngen/classify", json={"model": "lm", "input": "x"})
        assert r.status_code == 400 and "classification head" in r.json()["error"]["message"]
        text = "The value of the function is returned."
        score = http.post("/v1/rnngen/score", json={"model": "lm", "text": text}).json()
        assert len(score["surprisal"]) == len(text) and score["surprisal"][0] is None
        scored = [s for s in score["surprisal"] if s is not None]
        assert scored and all(s >= 0 for s in scored) and score["summary"]["bits_per_char"] > 0
        odd = http.post("/v1/rnngen/score", json={"model": "lm", "text": "The valuq"}).json()["surprisal"]
        assert odd[-1] > score["surprisal"][8]  # "q" after "valu" surprises more than "e"


def test_chat_sessions_answer_undo_reset_and_expire(server: Served, small_server: Served) -> None:
    with client(server) as http:
        sid = http.post("/v1/rnngen/sessions", json={"model": "lm", "seed": 2, "max_tokens": 40}).json()["id"]
        first = http.post(f"/v1/rnngen/sessions/{sid}/messages", json={"content": "Hello"}).json()
        assert first["turns"] == 1 and first["finish_reason"] in ("stop", "length")
        http.post(f"/v1/rnngen/sessions/{sid}/messages", json={"content": "Again"})
        assert len(http.get(f"/v1/rnngen/sessions/{sid}").json()["turns"]) == 2
        assert http.post(f"/v1/rnngen/sessions/{sid}/undo").json()["turns"] == 1
        assert http.get(f"/v1/rnngen/sessions/{sid}").json()["turns"][0]["reply"] == first["reply"]
        assert http.post(f"/v1/rnngen/sessions/{sid}/reset").json()["turns"] == 0
        assert http.post(f"/v1/rnngen/sessions/{sid}/undo").status_code == 409  # nothing to undo
        assert http.post(f"/v1/rnngen/sessions/{sid}/save").status_code == 404  # never a file on the server
        assert http.delete(f"/v1/rnngen/sessions/{sid}").status_code == 200
        assert http.get(f"/v1/rnngen/sessions/{sid}").status_code == 404
    sid = httpx.post(small_server.url + "/v1/rnngen/sessions", json={"model": "lm"}).json()["id"]
    assert httpx.get(f"{small_server.url}/v1/rnngen/sessions/{sid}").status_code == 200
    time.sleep(1.5)
    assert httpx.get(f"{small_server.url}/v1/rnngen/sessions/{sid}").status_code == 404  # expired


def test_a_session_reply_streams_and_a_client_that_leaves_ends_it(server: Served) -> None:
    with client(server) as http:
        new = {"model": "lm", "seed": 4, "max_tokens": 60}
        sids = [http.post("/v1/rnngen/sessions", json=new).json()["id"] for _ in range(2)]
        whole = http.post(f"/v1/rnngen/sessions/{sids[0]}/messages", json={"content": "Hello"}).json()
        with http.stream("POST", f"/v1/rnngen/sessions/{sids[1]}/messages",
                         json={"content": "Hello", "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            *pieces, last = events(r)
        assert all(p["finish_reason"] is None and p["delta"] for p in pieces)
        assert "".join(p["delta"] for p in pieces) == whole["reply"]  # the same seed: the same reply
        assert (last["finish_reason"], last["turns"]) == (whole["finish_reason"], 1)
        assert http.get(f"/v1/rnngen/sessions/{sids[1]}").json()["turns"][0]["reply"] == whole["reply"]
        # A reply without end: the client reads a few pieces and leaves; the reply stops, and the session keeps
        # the turn as interrupted (as `rnngen chat` keeps one cut by Ctrl-C) and takes the next message.
        sid = http.post("/v1/rnngen/sessions", json={"model": "lm", "max_tokens": 100_000, "stop": []}).json()["id"]
        with http.stream("POST", f"/v1/rnngen/sessions/{sid}/messages", json={"content": "Hi", "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
            assert http.post(f"/v1/rnngen/sessions/{sid}/messages", json={"content": "Hi"}).status_code == 409
        assert_no_stream_left(server)
        turns = http.get(f"/v1/rnngen/sessions/{sid}").json()["turns"]
        assert [t["finish_reason"] for t in turns] == ["interrupted"] and turns[0]["reply"]
        assert http.post(f"/v1/rnngen/sessions/{sid}/undo").json()["turns"] == 0


# ------------------------------------------------------------------------------------------- returned states
def test_a_returned_state_continues_the_text_on_another_process(server: Served, small_server: Served) -> None:
    with client(server) as http:
        body = {"model": "lm", "prompt": "The ", "temperature": 0}
        whole = http.post("/v1/completions", json={**body, "max_tokens": 60}).json()["choices"][0]["text"]
        first = http.post("/v1/completions", json={**body, "max_tokens": 30, "return_state": True}).json()
        state = first["choices"][0]["state"]
    # another server process with the same secret and checkpoint continues it: greedy, 30 + 30 is 60
    rest = httpx.post(small_server.url + "/v1/completions", json={"model": "lm", "state": state, "temperature": 0,
                                                                   "max_tokens": 30}).json()
    assert first["choices"][0]["text"] + rest["choices"][0]["text"] == whole


def _signed(tiny_run: Path, secret: bytes, tamper: Any) -> str:
    """A token signed with ``secret`` for a cursor that ``tamper(state, logits, identity)`` changed."""
    import torch

    from rnngen.checkpoint import resolve_checkpoint_dir
    from rnngen.generate import Cursor
    from rnngen.serve import StateCodec, checkpoint_identity

    directory = resolve_checkpoint_dir(tiny_run)
    vocab = json.loads((directory / "config.json").read_text())["model"]["vocab_size"]
    state, logits, identity = tamper((torch.zeros(1, 1, 32), torch.zeros(1, 1, 32)), torch.zeros(1, vocab),
                                     checkpoint_identity(directory))
    shapes = [tuple(t.shape) for t in (*state, logits)]
    return StateCodec(secret, identity, shapes, torch.device("cpu")).encode(Cursor(state, logits))


def test_a_tampered_or_foreign_state_is_a_400(server: Served, tiny_run: Path) -> None:
    import torch

    key = SECRET.encode()
    with client(server) as http:
        r = http.post("/v1/completions", json={"model": "lm", "prompt": "The ", "max_tokens": 5, "return_state": True})
        good = r.json()["choices"][0]["state"]
        raw = bytearray(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))
        raw[len(raw) // 2] ^= 1
        flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        bad = {
            "altered": (flipped, "altered"), "not base64": ("!!!", "base64"), "empty": ("", "expected"),
            "a number": (7, "expected"), "too large": ("A" * 5000, "too large"),
            "other secret": (_signed(tiny_run, b"another", lambda s, lg, i: (s, lg, i)), "altered"),
            "not finite": (_signed(tiny_run, key, lambda s, lg, i: ((s[0], s[1].fill_(float("nan"))), lg, i)),
                           "not finite"),
            "wrong shape": (_signed(tiny_run, key, lambda s, lg, i: ((torch.zeros(2, 1, 32),) * 2, lg, i)), "shapes"),
            "other checkpoint": (_signed(tiny_run, key, lambda s, lg, i: (s, lg, "0" * 64)), "another checkpoint"),
        }
        for why, (token, message) in bad.items():
            r = http.post("/v1/completions", json={"model": "lm", "state": token, "max_tokens": 5})
            assert r.status_code == 400, (why, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_state" and message in error["message"], (why, error)
        # a well-formed token of this checkpoint signed with the secret is accepted (the checks are not too strict)
        fine = _signed(tiny_run, key, lambda s, lg, i: (s, lg, i))
        for token in (good, fine):
            assert http.post("/v1/completions", json={"model": "lm", "state": token, "max_tokens": 5}).status_code == 200
        r = http.post("/v1/completions", json={"model": "lm", "state": "A" * 30_000})
        assert r.status_code == 413  # beyond --max-request-bytes: refused before it is read


# ----------------------------------------------------------------------------------------- batching, limits
def test_sixteen_concurrent_streams_step_together_and_match_their_solo_texts(server: Served) -> None:
    async def one(http: httpx.AsyncClient, seed: int) -> str:
        body = {"model": "lm", "prompt": "The ", "max_tokens": 60, "seed": seed, "stream": True, "top_p": 0.95}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            return "".join(c["choices"][0]["text"] for c in events(await _read(response)))

    async def all16() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120, limits=httpx.Limits(max_connections=32)) as http:
            return await asyncio.gather(*(one(http, seed) for seed in range(16)))

    before = server.metric("rnngen_model_steps_total")
    texts = asyncio.run(all16())
    steps = server.metric("rnngen_model_steps_total") - before
    assert steps < 16 * 60 / 2, steps  # one by one they would take 960 steps
    with client(server) as http:
        for seed, text in enumerate(texts):
            alone = http.post("/v1/completions", json={"model": "lm", "prompt": "The ", "max_tokens": 60, "seed": seed,
                                                       "top_p": 0.95}).json()["choices"][0]["text"]
            assert text == alone, seed
    assert len(set(texts)) == 16


async def _read(response: httpx.Response) -> httpx.Response:
    await response.aread()
    return response


def test_a_client_that_disconnects_frees_its_stream(server: Served) -> None:
    body = {"model": "lm", "max_tokens": 100_000, "stream": True}
    with client(server) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
        assert server.metric("rnngen_active_streams") == 1
    assert_no_stream_left(server)


def test_a_client_that_leaves_a_non_streaming_request_frees_it(server: Served) -> None:
    """Without streaming too: once the client has gone, the server stops spending steps on its request."""
    body = {"model": "lm", "max_tokens": 100_000}
    before = server.metric("rnngen_model_steps_total")
    with client(server, timeout=1.0) as http, pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body)  # the client gives up after a second and disconnects
    assert server.metric("rnngen_model_steps_total") > before + 50  # it was generating until then
    assert_no_stream_left(server)


def test_classify_score_and_prompts_stop_at_the_time_limit(hasty_server: Served) -> None:
    with httpx.Client(base_url=hasty_server.url, timeout=60) as http:
        for path, body in (("/v1/rnngen/classify", {"model": "letters", "input": ["aoeeao", "tsktk"]}),
                           ("/v1/rnngen/score", {"model": "lm", "text": "The value of the function is returned."}),
                           ("/v1/completions", {"model": "lm", "prompt": "The ", "max_tokens": 5}),
                           ("/v1/rnngen/sessions", {"model": "lm", "context": "A play."})):
            r = http.post(path, json=body)
            assert r.status_code == 408, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "time_limit" and "time limit" in error["message"], error
        assert http.get("/health").json()["status"] == "ok"  # the engine is free again


def test_a_guided_stream_in_the_batch_leaves_the_others_texts_alone(server: Served) -> None:
    """A guided stream takes two rows of the batch; the streams after it still read their own tokens."""
    with client(server) as http:
        plain = {"model": "letters", "prompt": "tsk", "temperature": 0, "max_tokens": 30}
        alone = http.post("/v1/completions", json=plain).json()["choices"][0]["text"]
        guided = {"model": "letters", "label": "vowels", "guidance": 1.5, "stop": ["#"], "max_tokens": 100_000,
                  "stream": True}
        with http.stream("POST", "/v1/rnngen/generate", json=guided) as r:
            lines = r.iter_lines()
            next(lines)  # the guided stream is in the batch (before any that comes next)
            assert http.post("/v1/completions", json=plain).json()["choices"][0]["text"] == alone
    assert_no_stream_left(server)


def test_a_long_prompt_does_not_stop_the_other_streams(roomy_server: Served) -> None:
    """While a 100k-character prompt is read, a stream already running keeps getting tokens: the prompt is read
    in chunks of PROMPT_CHUNK tokens with a batch step between two. (Read in one go, it would get none during the
    reading: only the few it gets around any request, which a request with a short prompt measures.)"""
    from rnngen.corpora import builtin_text
    from rnngen.serve import PROMPT_CHUNK

    long_prompt = (builtin_text() * 2)[:100_000]

    def others_tokens(http: httpx.Client, prompt: str) -> tuple[float, int]:
        """Tokens the running stream got during a request with ``prompt``, and the prompt's tokens."""
        before = roomy_server.metric("rnngen_tokens_generated_total")
        usage = http.post("/v1/completions", json={"model": "lm", "prompt": prompt, "max_tokens": 1}).json()["usage"]
        got = roomy_server.metric("rnngen_tokens_generated_total") - before - usage["completion_tokens"]
        return got, usage["prompt_tokens"]

    with httpx.Client(base_url=roomy_server.url, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json={"model": "lm", "max_tokens": 100_000, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        around, _ = others_tokens(http, "The ")
        during, prompt_tokens = others_tokens(http, long_prompt)
    chunks = prompt_tokens // PROMPT_CHUNK
    assert chunks >= 300
    assert during - around >= chunks // 2, (during, around, chunks)


def test_a_full_queue_is_a_503_with_retry_after(small_server: Served) -> None:
    with httpx.Client(base_url=small_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": "lm", "max_tokens": 100_000, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a line iterator dropped at once closes the response (a disconnect)
            next(lines)
            busy = http.post("/v1/completions", json={"model": "lm", "max_tokens": 5})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "server_overloaded"
        deadline = time.monotonic() + 5
        while small_server.metric("rnngen_active_streams") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.post("/v1/completions", json={"model": "lm", "max_tokens": 5}).status_code == 200


def test_api_key_size_limit_cors_and_errors_in_the_openai_shape(server: Served) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "lm", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health and metrics need no key
    with client(server) as http:
        r = http.post("/v1/completions", content=b'{"model": "lm", "prompt": "' + b"a" * 30_000 + b'"}')
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert http.post("/v1/completions", json={"model": "lm", "temperature": -1}).status_code == 400
        for huge in ({"seed": 2**70}, {"max_tokens": 10**400}, {"temperature": 10**400}):  # no overflow, no 500
            assert http.post("/v1/completions", json={"model": "lm", **huge}).status_code == 400, huge
        assert http.get("/v1/nothing").status_code == 404 and "error" in http.get("/v1/nothing").json()
        r = http.options("/v1/completions", headers={"Origin": "http://example.org",
                                                     "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://example.org"
        r = http.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") is None
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("rnngen_requests_total", "rnngen_tokens_generated_total", "rnngen_active_streams",
                 "rnngen_queue_length", "rnngen_step_seconds_sum"):
        assert f"# TYPE {name} " in metrics
    assert 'rnngen_requests_total{path="/v1/completions",status="401"}' in metrics


# ------------------------------------------------------------------------------------------------ playground
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium); the playground is tested in it")
    return found


class Browser:
    """Headless chromium driven over the DevTools protocol (a websocket): open a page, evaluate JavaScript."""

    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", "--remote-debugging-port=0",
                                      f"--user-data-dir={tmp}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = tmp / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.exit = contextlib.ExitStack()
        self.ws = self.exit.enter_context(websockets_sync.connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self.calls = 0

    def call(self, method: str, **params: Any) -> Any:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.calls:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, url: str, done: str, timeout: float = 30) -> None:
        """Load ``url`` and wait until the JavaScript ``done`` is true (the page's status shown if never)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.js(f"!!(document.body && ({done}))"):
            if time.monotonic() > deadline:
                pytest.fail(f"the page never got to {done}; its status: {self.js('document.body.innerText')!r}")
            time.sleep(0.1)

    def close(self) -> None:
        self.exit.close()
        self.proc.terminate()
        self.proc.wait(10)


def test_the_playground_streams_text_and_shows_surprisal_in_a_real_browser(server: Served, tmp_path: Path) -> None:
    page = httpx.get(server.url + "/").text
    assert "<script" in page and not re.search(r"(src|href)=\"(https?:)?//", page)  # self-contained: no CDN
    expected = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "lm", "prompt": "The ", "max_tokens": 40, "seed": 3, "temperature": 0.8}).json()["choices"][0]["text"]
    browser = Browser(tmp_path / "chromium")
    try:
        browser.open(f"{server.url}/?model=lm&key={KEY}&prompt=The%20&seed=3&max_tokens=40&temperature=0.8"
                     "&run=generate", "document.body.dataset.generated === 'done'")
        assert browser.js("document.getElementById('output_text').textContent") == expected
        assert browser.js("document.getElementById('finish').textContent") == "finished: length"
        browser.open(f"{server.url}/?model=lm&key={KEY}&text=The%20valuq&run=score",
                     "document.body.dataset.scored === 'done'")
        shades = browser.js("[...document.querySelectorAll('#surprisal .char')].map(s => s.dataset.nats)")
        assert len(shades) == len("The valuq") and shades[0] == "" and float(shades[-1]) > 0
        browser.open(f"{server.url}/?model=letters&key={KEY}&text=aoeeao&run=classify",
                     "document.body.dataset.classified === 'done'")
        rows = browser.js("[...document.querySelectorAll('#classes tr')].map(r => r.cells[0].textContent)")
        assert rows == ["vowels", "consonants"]
        assert browser.js("document.getElementById('status').textContent") == ""
    finally:
        browser.close()


# ---------------------------------------------------------------------------------------------- shutdown (last)
def test_sigterm_ends_streams_in_flight_with_a_final_event(small_server: Served) -> None:
    body = {"model": "lm", "max_tokens": 100_000, "stream": True}
    with httpx.Client(base_url=small_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        small_server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][6:])
    assert last["choices"][0]["finish_reason"] == "shutdown"
    assert small_server.proc.wait(20) == 0
    assert "stopped" in small_server.proc.stderr.read()
