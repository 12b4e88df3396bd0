"""Checkpoint directories: written atomically, loaded without ever unpickling.

A training run directory holds two checkpoints and the metrics log::

    run/
      best/      config.json  model.safetensors  tokenizer.json                 (lowest validation loss)
      last/      config.json  model.safetensors  tokenizer.json  trainer_state.json  trainer_state.safetensors
      metrics.jsonl

``load(run)`` takes ``best/`` (else ``last/``); a single checkpoint directory can be loaded directly.
Every checkpoint is written to a temporary sibling, fsynced, then renamed into place, so a crash
mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .version import __version__
from .config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError, InputError
from .model import RNNModel, attach_heads
from .tokenizers import Tokenizer, tokenizer_from_dict

FORMAT = "rnngen-checkpoint"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
TRAINER_JSON, TRAINER_TENSORS = "trainer_state.json", "trainer_state.safetensors"
METRICS = "metrics.jsonl"
BEST, LAST = "best", "last"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory with ``write``, then swap it in for ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)  # if we die before the next rename, loading falls back to .old
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory: Path, model: RNNModel, tokenizer: Tokenizer, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None,
                    trainer_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write a self-contained checkpoint (weights, config, tokenizer, optional trainer state)."""
    from safetensors.torch import save

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "rnngen_version": __version__,
              "model": to_dict(model.config), **meta}
    if len(model.heads):
        config["heads"] = {name: head.spec() for name, head in model.heads.items()}  # type: ignore[operator]
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        _write_bytes(tmp / WEIGHTS, save(weights))
        _write_json(tmp / TOKENIZER, tokenizer.to_dict())
        if trainer_state is not None:
            _write_json(tmp / TRAINER_JSON, trainer_state)
            _write_bytes(tmp / TRAINER_TENSORS, save({k: v.detach().to("cpu").contiguous()
                                                       for k, v in (trainer_tensors or {}).items()}))
        _write_json(tmp / CONFIG, config)  # last: a directory with config.json is complete

    write_dir_atomically(directory, write)


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory to load for ``path`` (a checkpoint, or a run with best/ and last/)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}; pass the directory that `rnngen train --out` wrote")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a checkpoint directory; pass the directory that `rnngen train` wrote")
    for candidate in (p, p / BEST, _old(p / BEST), p / LAST, _old(p / LAST)):
        if (candidate / CONFIG).is_file():
            return candidate
    raise CheckpointError(f"{p} is not an rnngen checkpoint (no {CONFIG}); pass the directory that "
                          "`rnngen train --out` wrote")


def run_dir_of(checkpoint_dir: Path) -> Path:
    """The run directory that holds ``checkpoint_dir`` (itself, for a stand-alone checkpoint)."""
    name = checkpoint_dir.name
    return checkpoint_dir.parent if name in (BEST, LAST, f".{BEST}.old", f".{LAST}.old") else checkpoint_dir


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG} is unreadable or not JSON ({exc.__class__.__name__}); "
                              "the checkpoint is damaged: use another one or retrain") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not an rnngen checkpoint (its {CONFIG} has another format)")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer rnngen (format {version}, this one reads "
                              f"{FORMAT_VERSION}); upgrade rnngen: pip install -U rnngen")
    return config


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the {what} in {path.parent} is missing or damaged ({exc.__class__.__name__}); "
                              "use another checkpoint or retrain") from None


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for truncation and bad headers
        raise CheckpointError(f"the {what} file {path} is truncated or corrupted ({str(exc)[:80]}); "
                              "use another checkpoint or retrain") from None


def load_checkpoint(path: str | os.PathLike[str],
                    device: torch.device | str = "cpu") -> tuple[RNNModel, Tokenizer, dict[str, Any], Path]:
    """Load a checkpoint: (model in eval mode, tokenizer, its config.json, the directory read)."""
    directory = resolve_checkpoint_dir(path)
    config = read_config(directory)
    try:
        model_config = from_dict(ModelConfig, config["model"])
    except (KeyError, TypeError, InputError) as exc:
        raise CheckpointError(f"{directory / CONFIG} has an invalid model section ({exc}); "
                              "the checkpoint is damaged") from None
    tokenizer = tokenizer_from_dict(_read_json(directory / TOKENIZER, "tokenizer"))
    if tokenizer.vocab_size != model_config.text_vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} symbols but the model "
                              f"expects {model_config.text_vocab_size}; the checkpoint is damaged")
    model = RNNModel(model_config)
    attach_heads(model, config)
    weights = _read_tensors(directory / WEIGHTS, "weights")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise CheckpointError(f"the weights in {directory} do not match its {CONFIG} ({first[:100]}); "
                              "the checkpoint is damaged: use another one or retrain") from None
    model.to(device).eval()
    return model, tokenizer, config, directory


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The resume state saved beside a ``last`` checkpoint."""
    if not (directory / TRAINER_JSON).is_file():
        raise CheckpointError(f"{directory} has no trainer state to resume from; start a new run instead")
    return (_read_json(directory / TRAINER_JSON, "trainer state"),
            _read_tensors(directory / TRAINER_TENSORS, "trainer state"))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; a torn last line (killed mid-write) is skipped."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_or_create(draft: Path, lock: Path, content: str) -> None:
    """Put the lock in place with its content, or raise FileExistsError. A file system without hard links
    gets an exclusive create, then the write (briefly empty)."""
    try:
        os.link(draft, lock)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(content)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while training; a second run refuses, a dead run's lock is cleared.

    The lock file appears with its owner already written in it (written aside, then hard-linked into place,
    which fails if a lock exists), so a lock is never seen empty while its owner is still writing it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    draft = run_dir / f".lock.{os.getpid()}"
    draft.write_text(me)
    try:
        for _ in range(2):
            try:
                _link_or_create(draft, lock, me)
                break
            except FileExistsError:
                try:
                    host, pid = lock.read_text().split()
                    stale = host == socket.gethostname() and not _pid_alive(int(pid))
                except (OSError, ValueError):  # unreadable or foreign: left by something else, not a live run
                    host, pid, stale = "?", "?", True
                if stale:
                    lock.unlink(missing_ok=True)
                    continue
                raise InputError(f"another training run (pid {pid} on {host}) is writing to {run_dir}; "
                                 "wait for it to finish or pick another --out") from None
        else:
            raise InputError(f"cannot take the lock of {run_dir} ({lock} keeps coming back); remove it by hand "
                             "if no training run is writing there")
    finally:
        draft.unlink(missing_ok=True)
    try:
        yield
    finally:
        try:
            if lock.read_text() == me:
                lock.unlink()
        except OSError:
            pass
