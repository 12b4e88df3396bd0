"""Terminal rendering for the CLI (rich): progress, tables, warnings, errors. Library code never prints."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)  # e.g. "[/path:12]" is text


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    stderr.print(message, soft_wrap=True, markup=False)


def fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class TrainProgress:
    """A progress bar for training runs; use as a context manager and pass ``update`` as the callback."""

    SCALE = 10_000

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("step {task.fields[step]:>6}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} chars/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=stderr, disable=not enabled, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("train", total=self.SCALE, step=0, loss="-", val="-", speed="-")

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event: Any) -> None:
        done = event.step / event.max_steps
        if event.max_time:
            done = max(done, event.elapsed / event.max_time)
        fields: dict[str, Any] = {"step": event.step}
        if event.loss is not None:
            fields["loss"] = f"{event.loss:.3f}"
        if event.chars_per_s:
            fields["speed"] = f"{event.chars_per_s:,.0f}"
        if event.val and "accuracy" in event.val:
            fields["val"] = f"acc {event.val['accuracy']:.3f}"
        elif event.val:
            fields["val"] = f"{event.val['loss']:.3f} ({event.val['bits_per_char']:.3f} bpc)"
        if event.kind == "nan":
            self.progress.console.print(f"[yellow]warning:[/] {event.message}")
        if event.sample is not None:  # above the bar: the model's text as it learns
            self.progress.console.print(f"[bold]sample at step {event.step}[/] (validation {fields['val']}):")
            self.progress.console.print(Text(event.sample.rstrip("\n") or "(empty)", style="dim"), soft_wrap=True)
        self.progress.update(self.task, completed=min(1.0, done) * self.SCALE, **fields)


def key_value_table(rows: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    return table


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
        confusion.add_column(name[:6], justify="right")
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


def stream(text: str) -> None:
    """Write generated text to stdout as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()
