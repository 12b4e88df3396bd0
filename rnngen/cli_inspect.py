"""`rnngen inspect CHECKPOINT FILE`: surprisal, interpretable cells and gate saturation (see rnngen.inspect).

Registered by rnngen/cli.py; it does not import it (no import cycle). torch is imported only when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EXAMPLES = (
    "rnngen inspect checkpoints/mine held_out.txt                 # summary, surprisal and cells in the terminal\n"
    "rnngen inspect checkpoints/mine held_out.txt --html report.html --png gates.png\n"
    "rnngen inspect checkpoints/py code.py --cells-png cells.png --max-chars 400   # figures as in the paper\n"
    "rnngen inspect checkpoints/py code.py --feature 'keyword=\\b(def|class|return)\\b' --top 5\n"
    "rnngen inspect checkpoints/mine held_out.txt --json > numbers.json\n"
    "rnngen inspect checkpoints/mine held_out.txt --layer 2 --max-chars 300"
)


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


@click.command(epilog="Examples:\n\n\b\n" + EXAMPLES)
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--feature", "features", multiple=True, metavar="NAME=REGEX",
              help="A feature of your own: a character is in it when a match of REGEX covers it (repeatable).")
@click.option("--top", default=3, show_default=True, callback=_positive, help="Cells listed per feature.")
@click.option("--layer", type=int, default=None, callback=_positive,
              help="List only the cells of this layer (from 1) [default: all].")
@click.option("--max-chars", default=600, show_default=True, callback=_positive,
              help="Characters shown as coloured text in the terminal.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report (hover a character for the model's predictions).")
@click.option("--html-chars", default=5000, show_default=True, callback=_positive,
              help="Characters of the text shown in the HTML report (all of it is scored).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False),
              help="Write the gate-saturation scatter plot (needs rnngen[plot]).")
@click.option("--cells-png", "cells_path", type=click.Path(dir_okay=False),
              help="Write the strongest cell of each feature as coloured text over the first --max-chars "
                   "characters, as the paper's figures (needs rnngen[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON instead of the coloured view.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def inspect_command(checkpoint: str, file: str, features: tuple[str, ...], top: int, layer: int | None,
                    max_chars: int, html_path: str | None, html_chars: int, png_path: str | None,
                    cells_path: str | None, as_json: bool,
                    encoding: str, errors: str, device: str) -> None:
    """Look inside CHECKPOINT while it reads FILE: the surprisal of each character, the cells that track
    features of the text (quotes, bracket depth, position in the line, ...) and how saturated the gates are.

    FILE is scored exactly as `rnngen eval` scores it, so the bits/char are the same.
    """
    from . import console
    from .errors import InputError
    from .inspect import inspect_checkpoint, parse_feature
    from .inspect_render import cells_png, gates_png, html_report, terminal_report

    extra = dict(parse_feature(spec) for spec in features)
    result = inspect_checkpoint(checkpoint, file, device=device, encoding=encoding, errors=errors, features=extra,
                                keep_chars=max(max_chars, html_chars if html_path else 0))
    if layer is not None and layer > result.layers:
        raise InputError(f"--layer {layer}: the model has {result.layers} layer(s); pick 1 to {result.layers}")
    if html_path:
        try:
            Path(html_path).write_text(html_report(result, title=f"{file} under {checkpoint}", top=top, layer=layer),
                                       encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {html_path}: {exc.strerror}; pick another --html path") from None
        console.note(f"wrote {html_path}")
    if png_path:
        gates_png(result, png_path)
        console.note(f"wrote {png_path}")
    if cells_path:
        cells_png(result, cells_path, max_chars=max_chars, layer=layer)
        console.note(f"wrote {cells_path}")
    if as_json:
        click.echo(json.dumps(result.to_dict(top, layer)))
        return
    console.stdout.print(f"[bold]{file}[/] under {checkpoint}: {result.arch} {result.layers}x{result.hidden}, "
                         f"{result.tokenizer} tokenizer")
    console.stdout.print(terminal_report(result, top, max_chars, layer), soft_wrap=True)
