"""Rendering an inspection (rnngen.inspect): coloured text for the terminal (rich), a self-contained HTML
report (inline CSS and JavaScript, nothing fetched) and the gate-saturation scatter plot (matplotlib)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .console import pyplot, save_figure
from .errors import InputError
from .inspect import LEFT, LN2, RIGHT, Cell, Inspection, Surprisal

MAX_BITS = 8.0  # surprisal shown at full colour from here up
GATE_COLOURS = {"input": "#1f77b4", "forget": "#2ca02c", "output": "#d62728", "reset": "#9467bd",
                "update": "#ff7f0e"}


def _heat_rgb(t: float) -> tuple[int, int, int]:
    """White (0) through yellow to red (1)."""
    t = min(max(t, 0.0), 1.0)
    return 255, int(255 - 175 * t), int(255 - 255 * min(1.0, 2 * t))


def _diverging_rgb(v: float) -> tuple[int, int, int]:
    """Blue (-1), white (0), red (+1)."""
    v = min(max(v, -1.0), 1.0)
    fade = int(255 * (1 - abs(v)))
    return (255, fade, fade) if v >= 0 else (fade, int(255 - 120 * abs(v)), 255)


def display_value(inspection: Inspection, cell: Cell) -> np.ndarray:
    """A cell's values over the kept text in [-1, 1]: h as it is, an LSTM cell state through tanh (as the paper)."""
    values = inspection.activation(cell)
    return np.tanh(values) if cell.kind == "c" else values


def _coloured(text: str, colours: list[tuple[int, int, int] | None]) -> Text:
    out = Text()
    for char, rgb in zip(text, colours):
        if char == "\n" or rgb is None:
            out.append(char)
        else:
            out.append(char, Style(color="black", bgcolor=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"))
    return out


def surprisal_text(s: Surprisal, max_chars: int) -> Text:
    """The kept text, each character on a background from white (0 bits) to red (8 bits or more)."""
    bits = s.per_char[: min(max_chars, len(s.text))] / LN2
    return _coloured(s.text, [None if math.isnan(b) else _heat_rgb(b / MAX_BITS) for b in bits])


def activation_text(inspection: Inspection, cell: Cell, max_chars: int) -> Text:
    """The kept text on the cell's value: blue (-1), white (0), red (+1)."""
    values = display_value(inspection, cell)[:max_chars]
    return _coloured(inspection.surprisal.text, [_diverging_rgb(float(v)) for v in values])


def summary_table(s: Surprisal) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    m = s.summary
    for key, value in (("bits/char", f"{m['bits_per_char']:.4f}"), ("nats/char", f"{m['nats_per_char']:.4f}"),
                       ("nats/token", f"{m['loss']:.4f}"), ("tokens scored", f"{m['tokens']:,}"),
                       ("characters scored", f"{m['chars']:,}")):
        table.add_row(key, value)
    return table


def spans_table(s: Surprisal) -> Table:
    table = Table(title="most surprising spans", title_justify="left")
    for col, justify in (("line", "right"), ("bits/char", "right"), ("text", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for span in s.spans:
        table.add_row(str(span["line"]), f"{span['bits_per_char']:.2f}", repr(span["text"]))
    return table


def cells_table(inspection: Inspection, top: int, layer: int | None = None) -> Table:
    table = Table(title="strongest cells per feature (Pearson r over all characters)", title_justify="left")
    table.add_column("feature")
    table.add_column("cells (layer, c|h, unit): r")
    for name in inspection.features:
        cells = inspection.strongest(name, top, layer)
        shown = ", ".join(f"{c.name} {r:+.2f}" for c, r in cells) if cells else "[dim]constant in this text[/]"
        table.add_row(name, shown)
    return table


def gates_table(inspection: Inspection) -> Table:
    table = Table(title=f"gates: mean share of steps left-saturated (< {LEFT}) / right-saturated (> {RIGHT})",
                  title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("gate")
    table.add_column("left", justify="right")
    table.add_column("right", justify="right")
    table.add_column("units mostly saturated", justify="right")
    for k, layer_gates in enumerate(inspection.gates):
        for gate, v in layer_gates.items():
            mostly = int(np.count_nonzero(v["left"] + v["right"] > 0.5))
            table.add_row(str(k + 1), gate, f"{v['left'].mean():.3f}", f"{v['right'].mean():.3f}",
                          f"{mostly}/{len(v['left'])}")
    return table


def terminal_report(inspection: Inspection, top: int, max_chars: int, layer: int | None = None) -> Group:
    """Everything for the terminal: summary, spans, surprisal text, cells and each feature's strongest cell."""
    s = inspection.surprisal
    parts: list[Any] = [summary_table(s), spans_table(s),
                        Text(f"surprisal of the first {min(max_chars, len(s.text)):,} characters "
                             f"(white 0 bits, red {MAX_BITS:g}+ bits):", style="bold"),
                        surprisal_text(s, max_chars), Text(""), cells_table(inspection, top, layer)]
    for name in inspection.features:
        best = inspection.strongest(name, 1, layer)
        if best:
            cell, r = best[0]
            parts += [Text(f"{name}: {cell.name}, r = {r:+.2f} (blue -1, red +1)", style="bold"),
                      activation_text(inspection, cell, max_chars), Text("")]
    if any(inspection.gates[0]):
        parts.append(gates_table(inspection))
    return Group(*parts)


# ----------------------------------------------------------------------------------------------- gates plot
def gates_svg(inspection: Inspection, size: int = 240) -> str:
    """The gate scatter as inline SVG, one square per layer: x left-saturated share, y right-saturated."""
    pad, plots = 30, []
    for k, layer_gates in enumerate(inspection.gates):
        inner = size - 2 * pad
        pts = []
        for gate, v in layer_gates.items():
            for left, right in zip(v["left"], v["right"]):
                pts.append(f'<circle cx="{pad + left * inner:.1f}" cy="{pad + (1 - right) * inner:.1f}" r="2.5" '
                           f'fill="{GATE_COLOURS[gate]}" fill-opacity="0.6"><title>{gate}</title></circle>')
        plots.append(
            f'<svg class="gates" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
            f'aria-label="layer {k + 1} gates">'
            f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad + inner}" y2="{pad + inner}" stroke="#ccc"/>'
            f'<text x="{size / 2}" y="18" text-anchor="middle">layer {k + 1}</text>'
            f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle" font-size="11">left-saturated share</text>'
            f'<text x="10" y="{size / 2}" text-anchor="middle" font-size="11" '
            f'transform="rotate(-90 10 {size / 2})">right-saturated share</text>{"".join(pts)}</svg>')
    legend = " ".join(f'<span style="color:{GATE_COLOURS[g]}">&#9679; {g}</span>' for g in inspection.gates[0])
    return f'<div class="legend">{legend}</div>' + "".join(plots)


def gates_png(inspection: Inspection, path: str | Path) -> None:
    """The paper's gate scatter (one panel per layer) as a PNG; needs matplotlib."""
    if not any(inspection.gates[0]):
        raise InputError("a plain RNN has no gates to plot; use --json or --html for its cells")
    plt = pyplot("--png")

    fig, axes = plt.subplots(1, inspection.layers, figsize=(3.4 * inspection.layers, 3.6), squeeze=False)
    for k, (ax, layer_gates) in enumerate(zip(axes[0], inspection.gates)):
        for gate, v in layer_gates.items():
            ax.scatter(v["left"], v["right"], s=10, alpha=0.6, color=GATE_COLOURS[gate], label=gate)
        ax.plot([0, 1], [1, 0], color="#ccc", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"layer {k + 1}", xlabel=f"share of steps < {LEFT}")
        ax.set_aspect("equal")
        if k == 0:
            ax.set_ylabel(f"share of steps > {RIGHT}")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{inspection.arch.upper()} gate saturation ({inspection.steps:,} steps)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, 110)


def _layout(text: str, width: int) -> list[tuple[int, int, str]]:
    """(column, row, character) of each character of ``text`` wrapped at ``width`` columns; a newline takes
    a place at the end of its row."""
    places, col, row = [], 0, 0
    for char in text:
        if col >= width:
            col, row = 0, row + 1
        places.append((col, row, " " if char in "\t\r" else char))
        col, row = (0, row + 1) if char == "\n" else (col + 1, row)
    return places


def cells_png(inspection: Inspection, path: str | Path, features: list[str] | None = None, max_chars: int = 600,
              layer: int | None = None, width: int = 100) -> None:
    """The strongest cell of each feature as coloured text (blue -1, white 0, red +1), one panel per feature,
    as the paper's figures; needs matplotlib."""
    plt = pyplot("--cells-png")
    from matplotlib.patches import Rectangle

    text = inspection.surprisal.text[:max_chars]
    places = _layout(text, width)
    rows = (places[-1][1] + 1) if places else 1
    panels = [(name, best[0]) for name in (features or inspection.features)
              if (best := inspection.strongest(name, 1, layer))]
    if not panels:
        raise InputError("no feature varies over this text, so no cell can be shown; pass a longer or richer FILE")
    cw, rh = 0.075, 0.17  # inches per character and per row
    fig = plt.figure(figsize=(width * cw + 0.3, len(panels) * (rows * rh + 0.35)))
    for i, (name, (cell, r)) in enumerate(panels):
        ax = fig.add_axes((0.01, 1 - (i + 1) / len(panels), 0.98, (rows * rh) / (len(panels) * (rows * rh + 0.35))))
        ax.set(xlim=(0, width), ylim=(rows, 0))
        ax.axis("off")
        ax.set_title(f"{name}: {cell.name}, r = {r:+.2f}", loc="left", fontsize=8)
        for (col, row, char), v in zip(places, display_value(inspection, cell)):
            rgb = _diverging_rgb(float(v))
            if char != "\n":
                ax.add_patch(Rectangle((col, row), 1, 1, color=tuple(c / 255 for c in rgb), lw=0))
                ax.text(col + 0.5, row + 0.55, char, ha="center", va="center", family="monospace", fontsize=6.5)
    save_figure(fig, path, 120)


# ----------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
.text { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.45;
        border: 1px solid #ddd; padding: .6em; max-height: 32em; overflow-y: auto; }
.text span.lane { box-shadow: -2px 0 0 #555; }
.text span.unscored { color: #999; }
#tip { position: absolute; display: none; background: #fff; border: 1px solid #888; padding: .4em .6em;
       font: 12px ui-monospace, monospace; box-shadow: 2px 2px 6px rgba(0,0,0,.2); pointer-events: none; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .15em .6em; text-align: left; }
th { border-bottom: 1px solid #ccc; } button.cell { font: 12px ui-monospace, monospace; margin: 1px; }
button.cell.on { background: #333; color: #fff; } .legend span { margin-right: 1em; } svg.gates { margin: .5em; }
.note { color: #555; font-size: 90%; }
"""

_JS = """
(function () {
  const D = JSON.parse(document.getElementById('data').textContent);
  const chars = Array.from(D.text);
  const tip = document.getElementById('tip');
  function heat(b) { const t = Math.min(Math.max(b / D.max_bits, 0), 1);
    return 'rgb(255,' + Math.round(255 - 175 * t) + ',' + Math.round(255 - 255 * Math.min(1, 2 * t)) + ')'; }
  function diverging(v) { v = Math.min(Math.max(v, -1), 1); const f = Math.round(255 * (1 - Math.abs(v)));
    return v >= 0 ? 'rgb(255,' + f + ',' + f + ')' : 'rgb(' + f + ',' + Math.round(255 - 120 * Math.abs(v)) + ',255)'; }
  function shown(c) { return c === '\\n' ? '\\\\n' : c === '\\t' ? '\\\\t' : c === ' ' ? '\\u2423' : c; }
  const lanes = new Set(D.lane_starts);
  function build(box) {
    const frag = document.createDocumentFragment(), spans = [];
    chars.forEach(function (c, i) {
      const s = document.createElement('span');
      s.textContent = c; s.dataset.i = i;
      if (lanes.has(i) && i > 0) s.className = 'lane';
      frag.appendChild(s); spans.push(s);
    });
    box.appendChild(frag);
    return spans;
  }
  const sbox = document.getElementById('surprisal'), sspans = build(sbox);
  sspans.forEach(function (s, i) {
    const b = D.bits[i];
    if (b === null) s.classList.add('unscored'); else if (chars[i] !== '\\n') s.style.background = heat(b);
  });
  function place(e) { tip.style.left = (e.pageX + 14) + 'px'; tip.style.top = (e.pageY + 14) + 'px';
    tip.style.display = 'block'; }
  function describe(i) {
    const head = document.createElement('div'), b = D.bits[i];
    head.textContent = '"' + shown(chars[i]) + '"  ' + (b === null ? 'not scored' : b.toFixed(2) + ' bits');
    const frag = [head], preds = D.predictions[D.token_of_char[i]];
    if (preds && preds.length) {
      const t = document.createElement('div'); t.textContent = 'the model predicted:'; frag.push(t);
      preds.forEach(function (p) { const d = document.createElement('div');
        d.textContent = '  "' + shown(p[0]) + '"  ' + (100 * p[1]).toFixed(1) + '%'; frag.push(d); });
    }
    return frag;
  }
  sbox.addEventListener('mouseover', function (e) {
    const i = e.target.dataset && e.target.dataset.i; if (i === undefined) return;
    tip.replaceChildren.apply(tip, describe(Number(i))); place(e);
  });
  sbox.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  const cbox = document.getElementById('cells'), cspans = build(cbox), info = document.getElementById('cellinfo');
  let current = null;
  function show(id) {
    const cell = D.cells[id]; current = cell;
    cspans.forEach(function (s, i) { s.style.background = chars[i] === '\\n' ? '' : diverging(cell.values[i] / 100); });
    info.textContent = cell.name + ' against ' + cell.feature + ': r = ' + cell.r.toFixed(3) +
      ' (blue -1, white 0, red +1' + (cell.kind === 'c' ? ', tanh of the cell state' : '') + ')';
    document.querySelectorAll('button.cell').forEach(function (b) { b.classList.toggle('on', b.dataset.id === id); });
  }
  document.querySelectorAll('button.cell').forEach(function (b) {
    b.addEventListener('click', function () { show(b.dataset.id); });
  });
  cbox.addEventListener('mouseover', function (e) {
    const i = e.target.dataset && e.target.dataset.i; if (i === undefined || !current) return;
    const d = document.createElement('div');
    d.textContent = '"' + shown(chars[Number(i)]) + '"  ' + (current.values[Number(i)] / 100).toFixed(2);
    tip.replaceChildren(d); place(e);
  });
  cbox.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  if (D.first_cell !== null) show(D.first_cell);
})();
"""


def html_report(inspection: Inspection, *, title: str = "", top: int = 3, layer: int | None = None) -> str:
    """A self-contained HTML page: surprisal with hover predictions, the strongest cells as coloured text,
    the gate scatter. Works offline: nothing is fetched."""
    s = inspection.surprisal
    n = len(s.text)
    bits = [None if math.isnan(b) else round(b / LN2, 2) for b in s.per_char[:n]]
    used_tokens = sorted(set(s.token_of_char.tolist()))
    predictions: dict[int, list[list[Any]]] = {t: [[p, round(q, 4)] for p, q in s.predictions_of_token(t)]
                                               for t in used_tokens}
    cells: dict[str, dict[str, Any]] = {}
    rows = []
    for name in inspection.features:
        buttons = []
        for cell, r in inspection.strongest(name, top, layer):
            cell_id = f"{name}:{cell.layer}:{cell.kind}:{cell.unit}"
            values = np.round(display_value(inspection, cell) * 100).astype(int).tolist()
            cells[cell_id] = {"name": cell.name, "kind": cell.kind, "feature": name, "r": r, "values": values}
            buttons.append(f'<button class="cell" data-id="{html.escape(cell_id)}">{html.escape(cell.name)} '
                           f'{r:+.2f}</button>')
        shown = "".join(buttons) or "<span class=note>constant in this text</span>"
        rows.append(f"<tr><td><b>{html.escape(name)}</b></td>"
                    f"<td class=note>{html.escape(inspection.descriptions[name])}</td><td>{shown}</td></tr>")
    data = {"text": s.text, "bits": bits, "token_of_char": s.token_of_char.tolist(),
            "predictions": [predictions.get(t, []) for t in range(max(used_tokens, default=-1) + 1)],
            "lane_starts": s.lane_starts, "max_bits": MAX_BITS, "cells": cells,
            "first_cell": next(iter(cells), None)}
    # "</" inside a script element would end it; JSON allows the escaped form.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    m = s.summary
    spans = "".join(f"<tr><td>{sp['line']}</td><td>{sp['bits_per_char']:.2f}</td>"
                    f"<td><code>{html.escape(repr(sp['text']))}</code></td></tr>" for sp in s.spans)
    gates = (gates_svg(inspection) + gates_table_html(inspection)) if any(inspection.gates[0]) else \
        "<p class=note>A plain RNN has no gates.</p>"
    kept = f"the first {n:,} characters" if n < m["chars"] else "the whole text"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rnngen inspect {html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>rnngen inspect</h1>
<p>{html.escape(title)}<br><span class=note>{inspection.arch.upper()} {inspection.layers}x{inspection.hidden},
{html.escape(inspection.tokenizer)} tokenizer</span></p>
<table><tr><th>bits/char</th><th>nats/char</th><th>nats/token</th><th>tokens scored</th><th>characters scored</th></tr>
<tr><td>{m['bits_per_char']:.4f}</td><td>{m['nats_per_char']:.4f}</td><td>{m['loss']:.4f}</td>
<td>{m['tokens']:,}</td><td>{m['chars']:,}</td></tr></table>
<h2>Surprisal</h2>
<p class=note>Each character on its loss, white (0 bits) to red ({MAX_BITS:g} bits or more), for {kept}; hover for
the model's top predictions at that place. Scored as <code>rnngen eval</code> scores: the text is read in parallel
lanes, each from a fresh state (a dark bar marks where one begins); grey characters are not scored.</p>
<div id="surprisal" class="text"></div>
<h3>Most surprising spans</h3>
<table><tr><th>line</th><th>bits/char</th><th>text</th></tr>{spans}</table>
<h2>Interpretable cells</h2>
<p class=note>Pearson correlation of each unit (c: LSTM cell state, h: hidden state; layers from 1) with each
feature, over all scored characters; a character counts with the state after the model read it. Click a cell
to see its value over the text.</p>
<table><tr><th>feature</th><th>what it is</th><th>strongest cells, r</th></tr>{''.join(rows)}</table>
<p id="cellinfo"></p>
<div id="cells" class="text"></div>
<h2>Gates</h2>
<p class=note>Each dot is one unit's gate: the share of steps it is below {LEFT} (x) and above {RIGHT} (y).</p>
{gates}
<div id="tip"></div>
<script type="application/json" id="data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


def gates_table_html(inspection: Inspection) -> str:
    rows = "".join(f"<tr><td>{k + 1}</td><td>{gate}</td><td>{v['left'].mean():.3f}</td><td>{v['right'].mean():.3f}"
                   f"</td></tr>" for k, layer_gates in enumerate(inspection.gates) for gate, v in layer_gates.items())
    return f"<table><tr><th>layer</th><th>gate</th><th>mean left share</th><th>mean right share</th></tr>{rows}</table>"
