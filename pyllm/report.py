"""Self-contained HTML for what pyllm shows people: pages with their CSS and script inline and images
as data URIs (nothing fetched, so a report opens offline and can be mailed as one file), token strips,
probability bars, heatmaps as PNGs, line charts as SVG, and the training report drawn from log.jsonl.

Rendering only: what is shown is computed elsewhere (pyllm.explain, pyllm.train). Not a plotting
library: a PNG encoder for small grey-level maps and polyline charts are all it needs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pyllm.io.atomic import write_text

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1d2330; background: #fbfbfd; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #dde;
     padding-bottom: 4px; }
.meta { color: #667; font-size: 13px; }
.strip { display: flex; flex-wrap: wrap; gap: 3px; font-family: ui-monospace, 'SF Mono', Menlo, monospace; }
.tok { border-radius: 4px; padding: 2px 4px; white-space: pre; border: 1px solid #0001; position: relative; }
.tok small { display: block; font-size: 10px; color: #556; text-align: center; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 8px; text-align: left; border-bottom: 1px solid #eef; vertical-align: middle; }
th { color: #556; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, 'SF Mono', Menlo, monospace; white-space: pre; }
.bar { height: 12px; background: #4a7bd0; border-radius: 2px; min-width: 1px; }
.bar.sampled { background: #e08a2e; }
.grid { display: grid; gap: 6px; align-items: start; }
.thumb { cursor: pointer; border: 1px solid #ccd; image-rendering: pixelated; width: 100%; }
.thumb:hover { outline: 2px solid #e08a2e; }
.cap { font-size: 11px; color: #667; text-align: center; }
#zoom { position: fixed; inset: 0; background: #000a; display: none; align-items: center; justify-content: center; }
#zoom.open { display: flex; }
#zoom .panel { background: #fff; padding: 16px; border-radius: 8px; max-width: 92vw; max-height: 92vh; overflow: auto; }
#zoom img { image-rendering: pixelated; width: min(70vh, 80vw); height: auto; border: 1px solid #ccd; }
.lens td { font-family: ui-monospace, Menlo, monospace; white-space: pre; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #556; }
"""

ZOOM_SCRIPT = """
document.querySelectorAll('.thumb').forEach(function (img) {
  img.addEventListener('click', function () {
    var zoom = document.getElementById('zoom');
    document.getElementById('zoom-img').src = img.src;
    document.getElementById('zoom-title').textContent = img.alt;
    zoom.classList.add('open');
  });
});
document.getElementById('zoom').addEventListener('click', function () { this.classList.remove('open'); });
"""


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document: inline style, `body`, and `script` run after it."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def write(path, document: str) -> Path:
    """Writes a document (UTF-8, atomically: a reader never sees half a page); the path, so callers
    can say where it went."""
    write_text(path, document)
    return Path(path)


def visible(piece: str) -> str:
    """A token's text with whitespace made visible (a space as ·, a newline as ↵)."""
    return piece.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "\u240d") or "\u2205"


# ----------------------------------------------------------------------------- colour

# A perceptually ordered ramp (light yellow to dark purple), interpolated: value 0 light, 1 dark.
_RAMP = np.array([[255, 255, 229], [254, 227, 145], [254, 153, 41], [217, 72, 1], [140, 45, 4], [60, 20, 80]],
                 np.float64)


def ramp(values) -> np.ndarray:
    """RGB bytes (..., 3) for values in [0, 1] (NaN as light grey)."""
    v = np.asarray(values, np.float64)
    nan = np.isnan(v)
    x = np.clip(np.where(nan, 0.0, v), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    t = (x - lo)[..., None]
    rgb = _RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t
    rgb[nan] = (235, 235, 240)
    return np.round(rgb).astype(np.uint8)


def css_colour(value: float) -> str:
    r, g, b = (int(c) for c in ramp(value))
    return f"rgb({r},{g},{b})"


def ink(value: float) -> str:
    """Text colour readable on css_colour(value)."""
    return "#fff" if not math.isnan(value) and value > 0.55 else "#1d2330"


# ----------------------------------------------------------------------------- images

def png(rgb: np.ndarray) -> bytes:
    """A PNG file of an (H, W, 3) uint8 image (8-bit RGB, no filter, zlib-compressed)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or not rgb.shape[0] or not rgb.shape[1]:
        raise ValueError(f"png needs an (H >= 1, W >= 1, 3) image, got {rgb.shape}")
    H, W, _ = rgb.shape
    raw = np.concatenate([np.zeros((H, 1), np.uint8), rgb.reshape(H, 3 * W)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def heatmap_uri(matrix: np.ndarray, scale: Optional[float] = None) -> str:
    """A data: URI of a PNG of a 2-D matrix (one pixel per entry, coloured by value / scale; scale
    defaults to the largest entry; NaN entries light grey)."""
    m = np.asarray(matrix, np.float64)
    top = scale if scale is not None else (float(np.nanmax(m)) if np.isfinite(m).any() else 1.0)
    rgb = ramp(m / top if top > 0 else np.zeros_like(m))
    return "data:image/png;base64," + base64.b64encode(png(rgb)).decode("ascii")


# ----------------------------------------------------------------------------- pieces

def token_strip(tokens: Sequence[tuple[int, str]], values: Optional[Sequence[float]] = None,
                titles: Optional[Sequence[str]] = None) -> str:
    """Token pieces in a row, each with its id below; coloured by `values` in [0, 1] (NaN: none),
    else alternately (how a tokenizer cuts a text)."""
    cells = []
    for i, (tid, piece) in enumerate(tokens):
        if values is not None:
            v = float(values[i])
            colour, text = css_colour(v), ink(v)
        else:
            colour, text = ("#dbe8fb", "#1d2330") if i % 2 == 0 else ("#fde7c8", "#1d2330")
        title = f' title="{escape(titles[i])}"' if titles is not None else ""
        cells.append(f'<span class="tok" style="background:{colour};color:{text}"{title}>{escape(visible(piece))}'
                     f'<small style="color:{text}">{tid}</small></span>')
    return f'<div class="strip">{"".join(cells)}</div>'


def bar(fraction: float, width_px: int = 220, sampled: bool = False) -> str:
    w = max(0.0, min(1.0, float(fraction))) * width_px
    return f'<div class="bar{" sampled" if sampled else ""}" style="width:{w:.1f}px"></div>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (escape text first)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def num(value: float, fmt: str = "{:.4f}") -> str:
    return f'<td class="num">{fmt.format(value)}</td>'


def thumbnails(label: str, images: Sequence[tuple[str, str, str]], size_px: int = 72) -> str:
    """A row of clickable heatmaps (uri, caption, title) after a label; a click shows one enlarged."""
    cells = "".join(f'<div><img class="thumb" src="{uri}" alt="{escape(title)}" title="{escape(title)}" '
                    f'style="width:{size_px}px;height:{size_px}px"><div class="cap">{escape(cap)}</div></div>'
                    for uri, cap, title in images)
    return (f'<div class="grid" style="grid-template-columns:64px repeat({len(images)}, {size_px}px)">'
            f'<div class="cap" style="text-align:left;padding-top:{size_px // 2 - 8}px">{escape(label)}</div>{cells}</div>')


ZOOM_PANEL = ('<div id="zoom"><div class="panel"><div id="zoom-title" class="meta"></div>'
              '<img id="zoom-img" alt="enlarged attention map"><div class="meta">rows: queries (tokens in order), '
              'columns: the keys they attend to; darker is more weight. Click to close.</div></div></div>')


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, y_label: str = "",
               width: int = 560, height: int = 220, log_y: bool = False) -> str:
    """An SVG line chart of named (x, y) series, axes labelled at their ends."""
    colours = ["#4a7bd0", "#e08a2e", "#3a9a5b", "#b04ac0"]
    points = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in series.values()]
    keep = [np.isfinite(y) & (y > 0 if log_y else True) for _, y in points]
    finite = [(x[k], y[k]) for (x, y), k in zip(points, keep)]
    xs = np.concatenate([x for x, _ in finite]) if finite else np.zeros(0)
    ys = np.concatenate([y for _, y in finite]) if finite else np.zeros(0)
    if not xs.size:
        return f'<div class="meta">{escape(title)}: nothing logged</div>'
    tr = np.log10 if log_y else (lambda v: v)
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(tr(ys).min()), float(tr(ys).max())
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 56, 12, 22, 28
    pw, ph = width - left - right, height - top - bottom

    def sx(v):
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return top + (1 - (tr(v) - y0) / (y1 - y0)) * ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="14" style="font-weight:600;fill:#1d2330">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#dde"/>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = 10 ** yv if log_y else yv
        py = top + (1 - frac) * ph
        parts.append(f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{label:.3g}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">{x0:.0f}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 8}" text-anchor="end">{x1:.0f} (step)</text>')
    if y_label:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 8}" text-anchor="middle">{escape(y_label)}</text>')
    for i, ((name, _), (x, y)) in enumerate(zip(series.items(), finite)):
        if not x.size:
            continue
        colour = colours[i % len(colours)]
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        if x.size <= 40:   # few points (evaluations): each one marked
            parts += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5" fill="{colour}"/>' for a, b in zip(x, y)]
        parts.append(f'<text x="{left + pw - 4}" y="{top + 14 + 14 * i}" text-anchor="end" '
                     f'style="fill:{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- training report

def training_report(log_path, title: str = "training") -> str:
    """The page of a run's log.jsonl: loss and validation loss, learning rate, gradient norm and
    tokens/s over the optimizer steps (lines that are not JSON objects are skipped)."""
    records = []
    for line in Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)

    def column(key: str) -> tuple[list, list]:
        rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [a for a, _ in rows], [b for _, b in rows]
    losses = {name: column(key) for name, key in (("train loss", "loss"), ("validation loss", "val_loss"))
              if column(key)[0]}
    charts = [line_chart(losses, "loss", log_y=False),
              line_chart({"learning rate": column("lr")}, "learning rate"),
              line_chart({"gradient norm": column("grad_norm")}, "gradient norm (before clipping)", log_y=True),
              line_chart({"tokens/s": column("tokens_per_s")}, "throughput (tokens/s)")]
    last = records[-1] if records else {}
    summary = ", ".join(f"{k} {last[k]}" for k in ("step", "loss", "val_loss", "lr") if k in last)
    body = (f"<h1>{escape(title)}</h1><div class=\"meta\">{escape(str(log_path))}: {len(records)} steps"
            f"{' · last: ' + escape(summary) if summary else ''}</div>"
            f'<div class="grid" style="grid-template-columns:repeat(auto-fill, minmax(560px, 1fr))">'
            + "".join(f"<div>{c}</div>" for c in charts) + "</div>")
    return page(title, body)
