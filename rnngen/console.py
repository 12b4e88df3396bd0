"""Terminal rendering for the CLI (rich): progress, tables, warnings, errors. Library code never prints."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import InputError

# Off a terminal (a pipe, a file, a CI log) nothing is redrawn and no line is cut to fit 80 columns.
WIDE = 160
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else WIDE)
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else WIDE)


def error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)  # e.g. "[/path:12]" is text


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    stderr.print(message, soft_wrap=True, markup=False)


def fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class TrainProgress:
    """Shows a training run: use as a context manager and pass ``update`` as the trainer's callback.

    ``shown``: the run's headline, then on a terminal a live progress bar and at each evaluation the sample
    the model writes; off a terminal, one plain line per evaluation and one at the end (nothing is redrawn).
    ``warnings``: NaN roll-backs (shown even when quiet).
    """

    SCALE = 10_000

    def __init__(self, shown: bool = True, warnings: bool = True) -> None:
        self.shown, self.warnings, self.live = shown, warnings, shown and stderr.is_terminal
        self.progress = Progress(
            TextColumn("step {task.fields[step]:>6}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} chars/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=stderr, disable=not self.live, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("train", total=self.SCALE, step=0, loss="-", val="-", speed="-")
        self.fields: dict[str, Any] = {"step": 0, "loss": "-", "val": "-", "speed": "-"}

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _line(self, event: Any, what: str) -> str:
        f = self.fields
        of = f"/{event.max_steps}" if event.max_steps else ""
        return (f"{what} {event.step}{of}: loss {f['loss']}, val {f['val']}, {f['speed']} chars/s, "
                f"{event.elapsed:.0f} s")

    def update(self, event: Any) -> None:
        if event.kind == "nan" and self.warnings:
            warn(event.message)
        if not self.shown:
            return
        if event.kind == "start":
            if event.message:
                note(event.message)
            self.progress.start()
        done = event.step / event.max_steps if event.max_steps else 0.0
        if event.max_time:
            done = max(done, event.elapsed / event.max_time)
        fields = self.fields
        fields["step"] = event.step
        if event.loss is not None:
            fields["loss"] = f"{event.loss:.3f}"
        if event.chars_per_s:  # a step's: the last few seconds; the end's: the whole run
            fields["speed"] = f"{event.chars_per_s:,.0f}"
        if event.val and "accuracy" in event.val:
            fields["val"] = f"acc {event.val['accuracy']:.3f}"
        elif event.val:
            fields["val"] = f"{event.val['loss']:.3f} ({event.val['bits_per_char']:.3f} bpc)"
        if event.sample is not None:  # above the bar: the model's text as it learns
            self.progress.console.print(f"[bold]sample at step {event.step}[/] (validation {fields['val']}):")
            self.progress.console.print(Text(event.sample.rstrip("\n") or "(empty)", style="dim"), soft_wrap=True)
        self.progress.update(self.task, completed=min(1.0, done) * self.SCALE, **fields)
        if not self.live and event.kind in ("eval", "end"):
            note(self._line(event, "step" if event.kind == "eval" else f"ended ({event.message.replace('_', ' ')})"
                                                                      " at step"))


def key_value_table(rows: dict[str, Any]) -> Text:
    """One ``key  value`` line per row, keys aligned; a long value is never cut (a terminal wraps it) and no
    line carries trailing spaces (what a table would pad a pipe's lines with)."""
    width = max(map(len, rows), default=0)
    text = Text(no_wrap=False, overflow="fold")
    for i, (key, value) in enumerate(rows.items()):
        text.append(("\n" if i else "") + key.ljust(width), style="bold")
        text.append(f"  {fmt(value)}")
    return text


def classification_tables(result: dict[str, Any]) -> Any:
    """Per-class precision/recall/F1 and the confusion matrix (rows: true class, columns: predicted)."""
    from rich.console import Group

    per_class = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, m in result["per_class"].items():
        per_class.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    classes = result["classes"]
    confusion = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("")
    for name in classes:
        confusion.add_column(name, justify="right")
    for name, row in zip(classes, result["confusion"]):
        confusion.add_row(name, *(f"[bold]{n}[/]" if i == j else (str(n) if n else "[dim]·[/]")
                                  for j, (i, n) in enumerate((classes.index(name), n) for n in row)))
    return Group(per_class, confusion)


@contextmanager
def reading(what: str, shown: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar on the terminal for reading a long text, updated by the ``progress(done, total)``
    it yields; None (no bar) when not ``shown`` or when stderr is not a terminal."""
    if not (shown and stderr.is_terminal):
        yield None
        return
    with Progress(TextColumn(what), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"),
                  TimeRemainingColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(what, total=1)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def working(what: str, shown: bool) -> Iterator[None]:
    """A transient spinner saying ``what`` on the terminal while a step with no measure of its progress runs;
    nothing when not ``shown`` or when stderr is not a terminal."""
    if not (shown and stderr.is_terminal):
        yield
        return
    with stderr.status(what):
        yield


def stream(text: str) -> None:
    """Write generated text to stdout as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def rule(title: str) -> None:
    """A dim line with a title on stderr, between samples."""
    stderr.rule(title, characters="-", style="dim")


def info(summary: dict[str, Any]) -> None:
    """`rnngen info`: a checkpoint's summary (see LoadedModel.summary), its history and its last sample."""
    m, best, classes = summary["model"], summary["best"], summary["classes"]
    if classes and "accuracy" in best:
        vote = summary.get("lm_vote") or 0.0
        best_text = (f"accuracy {best['accuracy']:.4f}, macro-F1 {best['macro_f1']:.4f}"
                     + (f" (with the language model's vote, weight {vote:g})" if vote else ""))
    else:
        best_text = f"{best['loss']:.4f} nats/token, {best['bits_per_char']:.4f} bits/char" if best else "-"
    tok = summary["tokenizer"]
    rows = {
        "model": f"{m['arch']} {m['layers']}x{m['hidden']}, embedding {m['emb_dim']}, dropout {m['dropout']}"
                 f"{', tied' if m['tie_weights'] else ''}{', bidirectional' if m['bidirectional'] else ''}",
        "parameters": f"{summary['parameters']:,}",
        "tokenizer": f"{tok['kind']}, {tok['vocab_size']} symbols",
        "vocabulary": repr(summary["vocabulary"]) if summary["vocabulary"] is not None else "(subwords)",
        **({"classes": f"{len(classes)}: {', '.join(classes)}"} if classes else {}),
        "corpus": summary["corpus"] or "-",
        **({"fine-tuned from": summary["base"]} if summary["base"] else {}),
        **({"chosen for the data": summary["chosen"]["line"]} if summary.get("chosen") else {}),
        "steps": summary["steps"], "training time": f"{summary['seconds'] or 0:.0f} s",
        "best step": summary["best_step"], "best validation": best_text,
        "written by": f"rnngen {summary['written_by'] or '?'}"}
    stdout.print(f"[bold]{summary['directory']}[/]")
    stdout.print(key_value_table(rows), soft_wrap=True)
    metrics = summary["history"]
    if metrics:
        columns = {"train loss": "train_loss", "val loss": "val_loss", "bits/char": "val_bits_per_char"}
        if any("val_accuracy" in r for r in metrics):
            columns = {"train loss": "train_loss", "val loss": "val_loss", "val accuracy": "val_accuracy",
                       "LM bits/char": "val_lm_bits_per_char"}
        table = Table(title="history (metrics.jsonl)", title_justify="left")
        for col in ("step", "seconds", *columns):
            table.add_column(col, justify="right")
        shown = metrics if len(metrics) <= 12 else metrics[:4] + metrics[-8:]
        for r in shown:
            table.add_row(str(r["step"]), f"{r['seconds']:.0f}", *(fmt(r.get(k)) for k in columns.values()))
        stdout.print(table)
    if summary["last_sample"]:  # what the model wrote at its last evaluation (`rnngen train --sample-length`)
        stdout.print(f"[bold]sample at step {summary['last_sample']['step']}[/] (metrics.jsonl):")
        stdout.print(Text(summary["last_sample"]["text"].rstrip("\n")), soft_wrap=True)


def pyplot(option: str) -> Any:
    """matplotlib's pyplot, drawing to files (Agg), or an InputError naming what ``option`` needs installed."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(f"{option} needs matplotlib: pip install 'rnngen[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int) -> None:
    """Write a matplotlib figure (and close it); an unwritable path is an InputError."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}; pick another path") from None
    finally:
        plt.close(fig)


def plot_curves(metrics: list[dict[str, Any]], title: str, output: str) -> None:
    """Training and validation loss against step and time, written to ``output`` (needs matplotlib)."""
    plt = pyplot("plotting")
    if not metrics:
        raise InputError(f"{title} has no metrics.jsonl records to plot; train for at least one evaluation")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in ((axes[0], "step"), (axes[1], "seconds")):
        xs = [r[key] for r in metrics]
        ax.plot(xs, [r.get("train_loss") for r in metrics], label="train (smoothed)")
        ax.plot(xs, [r["val_loss"] for r in metrics], label="validation", marker=".")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, output, 110)
