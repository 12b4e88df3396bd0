"""`rnngen export`: a checkpoint as ONNX graphs plus JSON, for programs that do not run PyTorch.

Registered on the main group at the end of cli.py; it does not import cli.py (no import cycle): errors reach
the group's handler, which prints them as one line.
"""

from __future__ import annotations

import json

import click

EXAMPLES = ("rnngen export checkpoints/mine -o exported/mine            # model.onnx, tokenizer, config, README\n"
            "rnngen export checkpoints/names -o exported/names --force  # replace what the folder holds\n"
            "python examples/onnx_sample.py exported/mine --prompt 'It was' -n 300 --top-p 0.9")


@click.command(epilog="Examples:\n\n\b\n" + EXAMPLES)
@click.argument("checkpoint", type=click.Path())
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (created; must be empty unless --force).")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="What to export to.")
@click.option("--force", is_flag=True, help="Replace the folder's contents if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the files written and the check's numbers as JSON.")
def export(checkpoint: str, out: str, fmt: str, force: bool, as_json: bool) -> None:
    """Export CHECKPOINT for other runtimes (needs rnngen[export]).

    Writes model.onnx (tokens and the recurrent state in, logits and the new state out; batch and time
    dynamic), tokenizer.json, config.json and a README.md with the contract; a classifier checkpoint also
    gets classifier.onnx. onnxruntime's outputs are checked against PyTorch's before the folder is written.
    """
    from . import console
    from .export import export_onnx

    result = export_onnx(checkpoint, out, fmt, force)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    diffs = ", ".join(f"{name} {d:.1e}" for name, d in result.max_difference.items())
    console.note(f"wrote {result.directory}: {', '.join(result.files)} (largest difference from PyTorch: {diffs})")
