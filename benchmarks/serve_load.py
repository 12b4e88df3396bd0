"""`rnngen serve` under load: concurrent streaming clients on loopback, then a memory soak.

A real `rnngen serve` process on a free 127.0.0.1 port serves a 2x256 LSTM on the CPU. For each level of
--clients, that many clients at once (asyncio + httpx, in this process) each stream one completion from
POST /v1/completions: --tokens tokens (500), a seed of its own, temperature 0.8 and no stop string, so
every text runs to its length. Per level: aggregate tokens/s (tokens received over the level's wall time),
time to first token and the gaps between text pieces (per-token latency; one piece a token with the
character tokenizer), p50/p99, errors by kind, and requests lost (accepted, but no final event). Tokens are
counted from the usage of the final event (stream_options.include_usage), text pieces beside them; the CPU
seconds of the server and of the clients (this process) show which of them the 2 cores were busy with.

The server's limits: --max-streams stepping at once and --max-queue waiting, so that the largest level
fits; one more level, --overload clients beyond that capacity, must get exactly that many 503s with
Retry-After and no crash. Then --soak seconds of repeated requests from --soak-clients clients while the
server's RSS (/proc/PID/status VmRSS) is sampled: RSS at start (after --soak-warmup s), max, end, and the
slope over the second half (MB per minute).

Targets (the issue): at 64 clients at least 8x the aggregate tokens/s of one client; no failed or lost
request up to the queue limit, 503s beyond it, never a crash; server memory flat over a 10-minute soak.

Without --checkpoint the model is trained here for 30 steps (`rnngen train data/python_source.txt
--preset plain --max-steps 30`, a 2x256 LSTM): the quality of the text does not matter for load, only the
shape of the model. The clients share the 2 cores with the server, as a real local client would; run it
alone on the machine. Every client has a timeout, the whole run --max-seconds, and the server is always
stopped (SIGTERM, then kill).

    python benchmarks/serve_load.py                                       # the recorded run (~15 min)
    python benchmarks/serve_load.py --clients 1,8 --tokens 50 --soak 20 \\
        --max-streams 4 --max-queue 4 --overload 4                        # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RNNGEN, ROOT, rnngen, save  # noqa: E402


# --------------------------------------------------------------------------------------------- the server
class Served:
    """A running `rnngen serve` process on a free loopback port, its output in ``log``."""

    def __init__(self, checkpoint: Path, options: list[str], log: Path) -> None:
        with socket.socket() as s:  # a free port (the server binds it right after)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([RNNGEN, "serve", str(checkpoint), "--host", "127.0.0.1", "--port",
                                          str(self.port), *options], stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rnngen serve exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"rnngen serve did not answer /health within {seconds:g} s: {self.tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds the server has used (user + system, all its threads)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM (streams in flight end cleanly), then kill; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# --------------------------------------------------------------------------------------------- one client
@dataclass
class Result:
    """What one streaming request saw. ``error`` is None for a complete text of the length asked for."""

    status: int = 0
    error: str | None = None
    retry_after: str | None = None
    ttft: float | None = None  # seconds from sending to the first text piece
    gaps: list[float] = field(default_factory=list)  # seconds between text pieces
    pieces: int = 0
    usage: int | None = None  # completion_tokens of the usage event
    finish: str | None = None
    done: bool = False  # "data: [DONE]" came

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.pieces

    @property
    def lost(self) -> bool:
        """Accepted, but the stream ended (or was given up) without a final event."""
        return self.status == 200 and not (self.finish and self.done)


async def stream_one(http: httpx.AsyncClient, tokens: int, seed: int, timeout: float) -> Result:
    body = {"prompt": "def ", "max_tokens": tokens, "seed": seed, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    r = Result()
    try:
        await asyncio.wait_for(_read_stream(http, body, r), timeout)
    except TimeoutError:
        r.error = "timeout"
    except httpx.HTTPError as exc:
        r.error = f"transport: {type(exc).__name__}"
    if r.error is None:
        if r.lost:
            r.error = "no final event"
        elif r.finish != "length":
            r.error = f"finish_reason {r.finish}"
        elif r.tokens != tokens:
            r.error = f"{r.tokens} tokens, not {tokens}"
    return r


async def _read_stream(http: httpx.AsyncClient, body: dict[str, Any], r: Result) -> None:
    sent = last = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        r.status, r.retry_after = response.status_code, response.headers.get("retry-after")
        if response.status_code != 200:
            await response.aread()
            r.error = f"http {response.status_code}" + ("" if r.retry_after else " without Retry-After")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                r.done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                r.usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    now = time.perf_counter()
                    if r.ttft is None:
                        r.ttft = now - sent
                    else:
                        r.gaps.append(now - last)
                    last, r.pieces = now, r.pieces + 1
                if choice.get("finish_reason"):
                    r.finish = choice["finish_reason"]


def client(url: str, count: int, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout, connect=30),
                             limits=httpx.Limits(max_connections=count, max_keepalive_connections=count))


def ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


# --------------------------------------------------------------------------------------------- levels, soak
async def level(served: Served, clients: int, tokens: int, timeout: float, expect_503: int = 0) -> dict[str, Any]:
    """``clients`` streaming requests at once; the level's record."""
    async with client(served.url, clients, timeout) as http:
        began, server_cpu, client_cpu = time.perf_counter(), served.cpu_s(), time.process_time()
        results = await asyncio.gather(*(stream_one(http, tokens, 1000 * clients + i, timeout)
                                         for i in range(clients)))
        wall, client_cpu = time.perf_counter() - began, time.process_time() - client_cpu
        server_cpu = None if server_cpu is None else (served.cpu_s() or server_cpu) - server_cpu
    received = sum(r.tokens for r in results)
    refused = [r for r in results if r.status == 503]
    ttfts, gaps = [r.ttft for r in results if r.ttft is not None], [g for r in results for g in r.gaps]
    return {
        "level": f"{clients} clients" + (f" ({expect_503} beyond capacity)" if expect_503 else ""),
        "clients": clients, "tokens_each": tokens, "wall_s": round(wall, 3),
        "tokens_received": received, "pieces_received": sum(r.pieces for r in results),
        "counted_by": "usage" if all(r.usage is not None for r in results if r.status == 200) else "pieces",
        "aggregate_tokens_per_s": round(received / wall, 1),
        "ttft_ms": {"p50": ms(ttfts, 50), "p99": ms(ttfts, 99)},
        "token_gap_ms": {"p50": ms(gaps, 50), "p99": ms(gaps, 99)},
        "ok": sum(r.error is None for r in results),
        "errors": dict(Counter(r.error for r in results if r.error is not None)),
        "lost": sum(r.lost for r in results),
        **({"expected_503": expect_503, "got_503": len(refused),
            "retry_after_on_every_503": all(r.retry_after for r in refused)} if expect_503 else {}),
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
        "server_alive": served.alive(), "server_rss_mb": served.rss_mb(),
    }


async def soak(served: Served, seconds: float, clients: int, tokens: int, warmup: float, every: float,
               timeout: float) -> dict[str, Any]:
    """``clients`` clients repeating requests for ``seconds`` while the server's RSS is sampled."""
    began = time.perf_counter()
    end = began + seconds
    results: list[Result] = []
    samples: list[tuple[float, float]] = []  # (seconds since the start, MB)

    async def repeat(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < end:
            left = end - time.perf_counter() + 30  # a request begun near the end may finish a little after it
            results.append(await stream_one(http, tokens, 10**6 * (i + 1) + n, min(timeout, left)))
            n += 1

    async def sample() -> None:
        while time.perf_counter() < end:
            rss = served.rss_mb()
            if rss is not None:
                samples.append((time.perf_counter() - began, rss))
            await asyncio.sleep(every)

    async with client(served.url, clients, timeout) as http:
        await asyncio.gather(sample(), *(repeat(i, http) for i in range(clients)))
    rss = served.rss_mb()
    if rss is not None:
        samples.append((time.perf_counter() - began, rss))
    after = [(t, m) for t, m in samples if t >= warmup] or samples
    second = [(t, m) for t, m in samples if t >= seconds / 2]
    slope = float(np.polyfit([t / 60 for t, _ in second], [m for _, m in second], 1)[0]) if len(second) >= 2 else None
    return {
        "level": "soak", "seconds": round(time.perf_counter() - began, 1), "clients": clients, "tokens_each": tokens,
        "requests": len(results), "ok": sum(r.error is None for r in results),
        "errors": dict(Counter(r.error for r in results if r.error is not None)), "lost": sum(r.lost for r in results),
        "rss_mb": {"start": round(after[0][1], 1), "max": round(max(m for _, m in after), 1),
                   "end": round(samples[-1][1], 1)} if samples else None,
        "rss_slope_second_half_mb_per_min": None if slope is None else round(slope, 3),
        "rss_samples": [[round(t, 1), round(m, 1)] for t, m in samples],
        "server_alive": served.alive(),
    }


async def run(served: Served, a: argparse.Namespace, record: dict[str, Any], deadline: float) -> None:
    """The levels, the level beyond capacity and the soak, each put in ``record`` as it ends; the soak is
    shortened to end by ``deadline`` (time.monotonic())."""
    await level(served, 1, min(a.tokens, 20), a.client_timeout)  # warm-up: first calls, allocator
    capacity = a.max_streams + a.max_queue
    plan = [(n, 0) for n in a.clients] + ([(capacity + a.overload, a.overload)] if a.overload else [])
    for clients, beyond in plan:
        row = await level(served, clients, a.tokens, a.client_timeout, expect_503=beyond)
        record["levels"].append(row)
        print(json.dumps(row), flush=True)
        if not row["server_alive"]:
            return
    seconds = min(a.soak, deadline - time.monotonic() - 45)
    if a.soak > 0 and seconds < a.soak:
        record["soak_shortened"] = f"to {max(seconds, 0):.0f} s by --max-seconds"
    if seconds > 0:
        row = await soak(served, seconds, a.soak_clients, a.tokens, min(a.soak_warmup, seconds / 2), a.sample_every,
                         a.client_timeout)
        record["soak"] = row
        print(json.dumps({k: v for k, v in row.items() if k != "rss_samples"}), flush=True)


def summary(record: dict[str, Any], target: float = 8.0) -> list[str]:
    rows = {r["clients"]: r for r in record["levels"]}
    lines = [f"{r['level']:>32}: {r['aggregate_tokens_per_s']:9.1f} tok/s  ttft p50/p99 {r['ttft_ms']['p50']}/"
             f"{r['ttft_ms']['p99']} ms  gap p50/p99 {r['token_gap_ms']['p50']}/{r['token_gap_ms']['p99']} ms  "
             f"ok {r['ok']}/{r['clients']}  lost {r['lost']}  errors {r['errors'] or 'none'}" for r in record["levels"]]
    if 1 in rows and 64 in rows:
        ratio = rows[64]["aggregate_tokens_per_s"] / rows[1]["aggregate_tokens_per_s"]
        lines.append(f"aggregate(64)/aggregate(1) = {ratio:.2f}x (target >= {target:g}x: "
                     f"{'met' if ratio >= target else 'NOT met'})")
    within = [r for r in record["levels"] if "expected_503" not in r]
    lines.append(f"within capacity: {sum(r['clients'] - r['ok'] for r in within)} failed, "
                 f"{sum(r['lost'] for r in within)} lost (target 0)")
    for r in record["levels"]:
        if "expected_503" in r:
            lines.append(f"beyond capacity: {r['got_503']} 503s of {r['expected_503']} expected, Retry-After on "
                         f"{'every one' if r['retry_after_on_every_503'] else 'NOT every one'}, "
                         f"{r['ok']} ok, {r['lost']} lost")
    if soak_row := record.get("soak"):
        rss = soak_row["rss_mb"] or {}
        lines.append(f"soak {soak_row['seconds']} s, {soak_row['requests']} requests ({soak_row['ok']} ok): RSS start "
                     f"{rss.get('start')} MB, max {rss.get('max')}, end {rss.get('end')}, second-half slope "
                     f"{soak_row['rss_slope_second_half_mb_per_min']} MB/min")
    lines.append(f"server: {'alive until stopped' if record.get('server_alive_at_end') else 'DIED'}, exit status "
                 f"{record.get('server_exit')}" + "".join(f"; {key.replace('_', ' ')}: {record[key]}"
                                                          for key in ("soak_shortened", "stopped") if key in record))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint (else train a 2x256 LSTM for 30 steps)")
    p.add_argument("--clients", default="1,8,64,256", help="the levels: concurrent clients, comma-separated")
    p.add_argument("--tokens", type=int, default=500, help="tokens each request asks for")
    p.add_argument("--max-streams", type=int, default=128, help="rnngen serve --max-streams")
    p.add_argument("--max-queue", type=int, default=128, help="rnngen serve --max-queue")
    p.add_argument("--overload", type=int, default=64, help="clients beyond streams + queue in a last level (0: none)")
    p.add_argument("--soak", type=float, default=600, help="seconds of repeated requests (0: no soak)")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--soak-warmup", type=float, default=30, help="seconds of the soak before its start RSS")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between RSS samples")
    p.add_argument("--client-timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--max-seconds", type=float, default=1800, help="the whole run, training and server included")
    a = p.parse_args()
    a.clients = [int(n) for n in a.clients.split(",")]
    started = time.monotonic()
    record: dict[str, Any] = {
        "clients": a.clients, "tokens_each": a.tokens, "max_streams": a.max_streams, "max_queue": a.max_queue,
        "overload": a.overload, "levels": [],
        "token_count": "completion_tokens of the final usage event (stream_options.include_usage)"}
    with tempfile.TemporaryDirectory(prefix="rnngen-serve-load-") as tmp:
        checkpoint = a.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "run"
            rnngen("train", str(ROOT / "data" / "python_source.txt"), "--preset", "plain", "--max-steps", "30",
                   "--out", str(checkpoint), "--quiet")
        info = json.loads(rnngen("info", str(checkpoint), "--json"))
        record["model"] = {**info["model"], "parameters": info["parameters"], "tokenizer": info["tokenizer"]}
        served = Served(checkpoint, ["--max-streams", str(a.max_streams), "--max-queue", str(a.max_queue),
                                     "--max-tokens", str(max(a.tokens, 4096))], Path(tmp) / "serve.log")
        try:
            served.wait_ready()
            deadline = started + a.max_seconds
            try:
                asyncio.run(asyncio.wait_for(run(served, a, record, deadline), deadline - time.monotonic()))
            except TimeoutError:
                record["stopped"] = f"--max-seconds {a.max_seconds:g} reached"
            record["server_alive_at_end"] = served.alive()
        finally:
            record["server_exit"] = served.stop()
            if not record.get("server_alive_at_end"):
                record["server_log_tail"] = served.tail()
    print(f"saved {save('serve_load', record)}")
    print("\n".join(summary(record)))


if __name__ == "__main__":
    main()
