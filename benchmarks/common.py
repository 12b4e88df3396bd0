"""Shared helpers for the benchmarks: where ../shared is, running commands, recording results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RNNGEN_SHARED", ROOT.parent / "shared"))
OUT = ROOT / "benchmarks" / "out"
RNNGEN = str(Path(sys.executable).with_name("rnngen"))  # the installed command, beside this Python


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or exit with a clear reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        sys.exit(f"skipped: {path} not found (set RNNGEN_SHARED to the shared folder)")
    return path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores {cpu}, {gpu}, torch {torch.__version__}, {platform.python_version()}"


def json_lines(command: list[str], **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``command`` and parse every JSON line it prints on stdout."""
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def save(name: str, record: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **record}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def rnngen(*args: str, input: str | None = None) -> str:
    """Run the installed `rnngen` command (beside this Python); its stdout, or exit with its error."""
    command = [RNNGEN, *args]
    proc = subprocess.run(command, capture_output=True, text=True, input=input)
    if proc.returncode != 0:
        sys.exit(f"`rnngen {' '.join(args[:2])}` failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc.stdout


T = TypeVar("T")


def each_available(names: str, get: Callable[[str, Path], T | None]) -> Iterator[tuple[str, T, Path]]:
    """For each comma-separated name: ``get(name, work)`` (work: benchmarks/out/corpora, where data sets are
    kept between runs), skipped with the reason printed where it cannot be had here."""
    work = OUT / "corpora"
    work.mkdir(parents=True, exist_ok=True)
    for name in names.split(","):
        item = get(name, work)
        if item is None:
            print(f"skipped {name}: not available here", flush=True)
            continue
        yield name, item, work
