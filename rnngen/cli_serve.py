"""`rnngen serve`: the HTTP server (rnngen/serve.py) run on uvicorn, with Ctrl-C/SIGTERM ending streams cleanly.

Registered on the main group at the end of cli.py; it does not import cli.py (no import cycle).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

EXAMPLES = ("rnngen serve checkpoints/mine                       # http://127.0.0.1:8000/ : the playground\n"
            "rnngen serve poems=checkpoints/poems names=checkpoints/names-cls --port 9000\n"
            "rnngen serve checkpoints/mine --host 0.0.0.0 --api-key \"$KEY\" --cors-origin https://example.org\n"
            "rnngen serve checkpoints/shakespeare --user-prefix 'ROMEO:' --bot-prefix 'JULIET:'")


def _named(checkpoints: tuple[str, ...]) -> dict[str, str]:
    """Model name -> path: NAME=PATH, else the run directory's name."""
    names: dict[str, str] = {}
    for spec in checkpoints:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.path.exists(spec):
            path = spec
            p = Path(spec.rstrip("/"))
            name = p.parent.name if p.name in ("best", "last") else p.name
        if name in names:
            raise click.UsageError(f"two checkpoints would be called {name!r}; name them: NAME=PATH")
        names[name] = path
    return names


def _per_model(values: tuple[str, ...], names: dict[str, str]) -> dict[str, str]:
    """--user-prefix TEXT (every model) or MODEL=TEXT (one model), \\n allowed."""
    from .chat import unescape

    result = {}
    for value in values:
        model, sep, text = value.partition("=")
        if sep and model in names:
            result[model] = unescape(text)
        else:
            result[""] = unescape(value)
    return result


@click.command(epilog="Examples:\n\n\b\n" + EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--api-key", envvar="RNNGEN_API_KEY", help="Require this key (Authorization: Bearer KEY) for /v1/... "
                                                        "[env RNNGEN_API_KEY].")
@click.option("--secret", envvar="RNNGEN_SERVE_SECRET",
              help="Key of the HMAC that protects returned states; give every process serving the same checkpoints "
                   "the same one [env RNNGEN_SERVE_SECRET; default: random per process].")
@click.option("--cors-origin", multiple=True, help="Allow browser pages from this origin (repeatable; * for any).")
@click.option("--max-streams", type=click.IntRange(min=1), default=64, show_default=True,
              help="Streams generating at once, per model (stepped as one batch).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Streams waiting for a place, per model; beyond it a 503 with Retry-After.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens one request may ask for (per choice).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Largest request body; beyond it a 413.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take, from its arrival: a generation then ends with finish_reason "
                   "time_limit; a prompt, classification or score not done by then is a 408.")
@click.option("--session-ttl", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True,
              help="Seconds a chat session is kept after its last use.")
@click.option("--user-prefix", multiple=True, help="Chat: put before each user message, e.g. 'ROMEO:'; MODEL=TEXT "
                                                   "for one model (repeatable).")
@click.option("--bot-prefix", multiple=True, help="Chat: put before each reply, e.g. 'JULIET:'; MODEL=TEXT for one "
                                                  "model (repeatable).")
def serve(checkpoints: tuple[str, ...], host: str, port: int, device: str, api_key: str | None, secret: str | None,
          cors_origin: tuple[str, ...], max_streams: int, max_queue: int, max_tokens: int, max_request_bytes: int,
          timeout: float, session_ttl: float, user_prefix: tuple[str, ...], bot_prefix: tuple[str, ...]) -> None:
    """Serve CHECKPOINTs over HTTP (needs rnngen[serve]): an OpenAI-compatible API, rnngen's own endpoints
    (classify, score, chat sessions), /health, /metrics and a playground page at /.

    Each CHECKPOINT is loaded once; NAME=CHECKPOINT names the model (else the directory's name). Ctrl-C or
    SIGTERM stops the server: streams in flight end with a final event.
    """
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError("rnngen serve needs the serve extra: pip install 'rnngen[serve]'") from None
    from . import console
    from .loaded import LoadedModel
    from .runtime import resolve_device
    from .serve import Settings, create_app

    names = _named(checkpoints)
    where = str(resolve_device(device))
    models = {name: LoadedModel.load(path, device=where) for name, path in names.items()}
    settings = Settings(api_key=api_key or None, secret=(secret or "").encode(), cors_origins=cors_origin,
                        max_streams=max_streams, max_queue=max_queue, max_tokens=max_tokens,
                        default_tokens=min(256, max_tokens), max_request_bytes=max_request_bytes, timeout=timeout,
                        session_ttl=session_ttl, user_prefix=_per_model(user_prefix, names),
                        bot_prefix=_per_model(bot_prefix, names))
    app = create_app(models, settings)
    if not secret:
        console.note("no --secret: returned states are good for this process only (set RNNGEN_SERVE_SECRET)")

    class Server(uvicorn.Server):
        """uvicorn's server that, on Ctrl-C or SIGTERM, first ends every stream with a final event."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = app.state.loop
            if loop is not None and not self.should_exit:
                loop.call_soon_threadsafe(app.state.server.drain)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own re-raises the signal once stopped (the process then dies of it); a stop asked for
            # with Ctrl-C or SIGTERM is a clean one here: exit status 0.
            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: Any = None) -> None:
            import asyncio

            app.state.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started:
                bound = [s.getsockname() for srv in self.servers for s in (srv.sockets or [])]
                shown = bound[0][1] if bound else port
                url_host = f"[{host}]" if ":" in host else host
                console.note(f"serving {', '.join(names)} on {where} at http://{url_host}:{shown}/ "
                             "(Ctrl-C stops)")

    app.state.loop = None
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                            lifespan="on")
    Server(config).run()
    console.note("stopped")
