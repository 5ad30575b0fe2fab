"""Write ``report.json``, ``report.md`` and ``report.html`` for ``slimformer compare``.

All three documents are rendered in memory first; only then is each written to a
temporary file in the output directory and renamed into place. Any failure
removes what this call wrote, so a report directory never holds a half-written
or mixed set of files.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer.report import plots
from slimformer.report.pareto import _usable, pareto_front

MISSING = "—"
STAR = "★"
FILES = ("report.json", "report.md", "report.html")

# (pareto key, row field, axis label, plot title, log x?, scale to axis units)
_AXES = (
    ("bytes", "stored_bytes", "stored size (MB, log scale)",
     "Perplexity vs stored size", True, 1e-6),
    ("latency", "decode_latency_ms", "decode latency (ms / token)",
     "Perplexity vs decode latency", False, 1.0),
)


# ---------------------------------------------------------------- formatting

def _num(value: Any, sig: int = 4) -> str:
    """A number to ``sig`` significant figures without exponent where sensible;
    None/NaN become the missing marker, other non-numbers their ``str``."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return MISSING
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag < -4:
        return f"{v:.{sig - 1}e}"
    return f"{v:,.{max(0, sig - 1 - mag)}f}"


def _fixed(value: Any, decimals: int, factor: float = 1.0) -> str:
    """``value * factor`` (e.g. bytes to MB) with fixed decimals so a column
    lines up; magnitudes below 1 keep 3 significant figures instead."""
    if not _usable(value):
        return _num(value)
    v = float(value) * factor
    return f"{v:,.{decimals}f}" if v == 0 or abs(v) >= 1 else _num(v, 3)


def _delta_pct(value: Any, base: Any) -> str:
    """Relative change against the baseline, e.g. ``+1.23%``."""
    if not (_usable(value) and _usable(base)) or base == 0:
        return MISSING
    return f"{(value / base - 1) * 100:+.2f}%"


def _times_smaller(value: Any, base: Any) -> str:
    """How many times smaller than the baseline, e.g. ``3.95×``."""
    if not (_usable(value) and _usable(base)) or value <= 0 or base <= 0:
        return MISSING
    return f"{base / value:.2f}×"


def _percent(value: Any) -> str:
    """A fraction shown as a percentage (top-1 agreement)."""
    return f"{value * 100:.1f}%" if _usable(value) else _num(value)


# ---------------------------------------------------------------- table model

@dataclass
class _Column:
    header: str
    cell: Callable[[dict], str]
    numeric: bool = True


def _task_value(row: dict, task: str, metric: str) -> Any:
    metrics = (row.get("tasks") or {}).get(task)
    return metrics.get(metric) if isinstance(metrics, dict) else None


def _fallbacks(row: dict) -> list[str]:
    value = row.get("fallbacks") or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _columns(rows: list[dict]) -> list[_Column]:
    """The table's columns; the first row is the baseline for Δ% and ×smaller."""
    base = rows[0] if rows else {}
    cols = [
        _Column("perplexity", lambda r: _fixed(r.get("perplexity"), 2)),
        _Column("Δ% vs base", lambda r: _delta_pct(r.get("perplexity"), base.get("perplexity"))),
        _Column("stored MB", lambda r: _fixed(r.get("stored_bytes"), 1, 1e-6)),
        _Column("× smaller", lambda r: _times_smaller(r.get("stored_bytes"), base.get("stored_bytes"))),
        _Column("KL", lambda r: _num(r.get("kl"), 3)),
        _Column("top-1", lambda r: _percent(r.get("top1_agreement"))),
        _Column("decode tok/s", lambda r: _fixed(r.get("decode_tokens_per_s"), 1)),
        _Column("prefill tok/s", lambda r: _fixed(r.get("prefill_tokens_per_s"), 1)),
        _Column("peak RSS MB", lambda r: _fixed(r.get("peak_rss_bytes"), 0, 1e-6)),
        _Column("compress s", lambda r: _fixed(r.get("compress_seconds"), 2)),
    ]
    if any(r.get("embedding_bytes_saved") for r in rows):   # the QuantizeEmbeddings stage
        cols.append(_Column("embedding MB saved", lambda r: _fixed(r.get("embedding_bytes_saved"), 1, 1e-6)))
    # One column per (task, metric) seen in any row, in order of first appearance;
    # "n" is a sample count, not a metric (it stays in report.json).
    seen: dict[tuple[str, str], None] = {}
    for row in rows:
        for task, metrics in (row.get("tasks") or {}).items():
            if isinstance(metrics, dict):
                for metric in metrics:
                    if metric != "n":
                        seen[(str(task), str(metric))] = None
    for task, metric in seen:
        cols.append(_Column(f"{task} {metric}",
                            lambda r, t=task, m=metric: _num(_task_value(r, t, m), 3)))
    if any(_fallbacks(r) for r in rows):
        cols.append(_Column("fallbacks", lambda r: str(len(_fallbacks(r))) if _fallbacks(r) else ""))
    return cols


def _name_cell(row: dict, starred: set[str]) -> str:
    name = str(row["name"])
    return f"{name} {STAR}" if name in starred else name


def _flatten(meta: dict, prefix: str = ""):
    """Yield (dotted key, text) for nested meta, e.g. ``versions.torch``."""
    for key, value in meta.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, dotted + ".")
        elif isinstance(value, (list, tuple)):
            yield dotted, shlex.join(str(v) for v in value)
        else:
            yield dotted, MISSING if value is None else str(value)


def _front_note(rows: list[dict], fronts: dict[str, list[str]]) -> str:
    """Legend under the table: who is on which frontier, and the baseline."""
    def names(key: str) -> str:
        return ", ".join(fronts[key]) or "none"
    base = str(rows[0]["name"]) if rows else MISSING
    return (f"{STAR} on a Pareto frontier: size vs perplexity: {names('bytes')}; "
            f"latency vs perplexity: {names('latency')}. "
            f"Δ% and × smaller are relative to the first row ({base}).")


# ---------------------------------------------------------------- JSON

def _json_safe(obj: Any) -> Any:
    """Plain JSON types only: NaN/inf become None, numpy/torch scalars are unwrapped."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _render_json(rows: list[dict], meta: dict, fronts: dict[str, list[str]]) -> str:
    doc = {"meta": meta, "rows": rows, "pareto": fronts}
    return json.dumps(_json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# ---------------------------------------------------------------- Markdown

def _md(text: str) -> str:
    """Escape text for a Markdown table cell or list item (one line, no markup)."""
    text = " ".join(str(text).split())
    for ch in "\\|<>*_`[]":
        text = text.replace(ch, "\\" + ch)
    return text


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _render_md(rows, meta, fronts, cols, starred) -> str:
    out = [f"# slimformer compare: {_md(meta.get('model', MISSING))}", ""]
    out.append("| name | " + " | ".join(_md(c.header) for c in cols) + " |")
    out.append("|:---|" + "".join("---:|" if c.numeric else ":---|" for c in cols))
    for row in rows:
        cells = [_name_cell(row, starred)] + [c.cell(row) for c in cols]
        out.append("| " + " | ".join(_md(x) for x in cells) + " |")
    out += ["", _md(_front_note(rows, fronts)), "", "## Setup", ""]
    out += [f"- **{_md(k)}**: {_md(v)}" for k, v in _flatten(meta)]

    out += ["", "## Fallbacks", ""]
    with_fb = [r for r in rows if _fallbacks(r)]
    if not with_fb:
        out.append("None: every layer was processed as asked.")
    for row in with_fb:
        out.append(f"- **{_md(row['name'])}**: " + ", ".join(_md(f) for f in _fallbacks(row)))

    recipes = [r for r in rows if r.get("recipe") is not None]
    if recipes:
        out += ["", "## Recipes"]
    for row in recipes:
        text = str(row["recipe"]).rstrip("\n")
        fence = _fence(text)
        out += ["", f"### {_md(row['name'])}", "", f"{fence}yaml", text, fence]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#d9480f; --band:#f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 2rem 1.5rem 4rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; border-bottom: 1px solid var(--line); padding-bottom: .3rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
.sub, .note { color: var(--muted); font-size: .9rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .88rem; }
th, td { padding: .35rem .7rem; border-bottom: 1px solid var(--line); white-space: nowrap; text-align: left; }
thead th { background: var(--band); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td:first-child { color: var(--accent); font-weight: 600; }
tr.base td { background: #fbfbfc; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; flex: 1 1 480px; max-width: 640px; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .3rem; }
pre { background: var(--band); border: 1px solid var(--line); border-radius: 4px;
  padding: .8rem 1rem; overflow-x: auto; font-size: .85rem; }
table.meta td:first-child { color: var(--muted); }
table.meta td { white-space: normal; word-break: break-all; }
"""


def _figure_html(svg: str | None, title: str, note: str) -> str:
    esc = html.escape
    parts = ["<figure>"]
    if svg is not None:
        # A data: URI keeps each SVG an isolated document (no id clashes between
        # plots) and still needs nothing outside this file.
        data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
        parts.append(f'<img src="data:image/svg+xml;base64,{data}" alt="{esc(title)}">')
    else:
        parts.append(f"<p class=\"note\">{esc(title)}: nothing to plot.</p>")
    if note:
        parts.append(f"<figcaption>{esc(note)}</figcaption>")
    parts.append("</figure>")
    return "".join(parts)


def _render_html(rows, meta, fronts, cols, starred, figures) -> str:
    esc = html.escape
    model = str(meta.get("model", MISSING))
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>slimformer compare: {esc(model)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>slimformer compare: {esc(model)}</h1>",
    ]
    sub = " · ".join(str(meta[k]) for k in ("date",) if meta.get(k) is not None)
    if sub:
        out.append(f'<p class="sub">{esc(sub)}</p>')

    # Results table
    out.append('<h2>Results</h2><div class="scroll"><table><thead><tr><th>name</th>')
    out += [f'<th class="{"num" if c.numeric else ""}">{esc(c.header)}</th>' for c in cols]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        classes = " ".join(k for k, on in (("base", i == 0), ("front", str(row["name"]) in starred)) if on)
        out.append(f'<tr class="{classes}"><td>{esc(_name_cell(row, starred))}</td>')
        out += [f'<td class="{"num" if c.numeric else ""}">{esc(c.cell(row))}</td>' for c in cols]
        out.append("</tr>")
    out.append(f'</tbody></table></div><p class="note">{esc(_front_note(rows, fronts))}</p>')

    out.append('<h2>Trade-offs</h2><div class="plots">')
    out += [_figure_html(*fig) for fig in figures]
    out.append("</div>")

    out.append("<h2>Fallbacks</h2>")
    with_fb = [r for r in rows if _fallbacks(r)]
    if not with_fb:
        out.append("<p>None: every layer was processed as asked.</p>")
    else:
        out.append("<ul>")
        for row in with_fb:
            items = ", ".join(f"<code>{esc(f)}</code>" for f in _fallbacks(row))
            out.append(f"<li><strong>{esc(str(row['name']))}</strong>: {items}</li>")
        out.append("</ul>")

    out.append('<h2>Setup</h2><table class="meta"><tbody>')
    out += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _flatten(meta)]
    out.append("</tbody></table>")

    recipes = [r for r in rows if r.get("recipe") is not None]
    if recipes:
        out.append("<h2>Recipes</h2>")
    for row in recipes:
        out.append(f"<h3>{esc(str(row['name']))}</h3><pre>{esc(str(row['recipe']))}</pre>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _figures(rows: list[dict], fronts: dict[str, list[str]]) -> list[tuple[str | None, str, str]]:
    """(svg or None, title, note about rows left out) for each trade-off plot."""
    figures = []
    for key, field, xlabel, title, logx, scale in _AXES:
        points, left_out = [], []
        for row in rows:
            x, y = row.get(field), row.get("perplexity")
            if _usable(x) and _usable(y) and (x > 0 or not logx):
                points.append((str(row["name"]), float(x) * scale, float(y)))
            else:
                left_out.append(str(row["name"]))
        note = f"Not plotted ({field} or perplexity missing): {', '.join(left_out)}." if left_out else ""
        svg = (plots.plot_tradeoff(points, fronts[key], title=title, xlabel=xlabel, logx=logx)
               if points else None)
        figures.append((svg, title, note))
    return figures


# ---------------------------------------------------------------- writing

def _write_all(out_dir: Path, docs: dict[str, str]) -> None:
    """Write each document to a temp file in ``out_dir``, then rename them all
    into place. On any failure remove the temp files and whatever this call had
    already renamed, so no partial report is left behind."""
    temps: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        for name, text in docs.items():
            tmp = out_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            temps[name] = tmp
            # O_EXCL: never clobber someone else's file; mode 0o666 honours the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
            placed.append(out_dir / name)
    except BaseException:
        for path in [*temps.values(), *placed]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        raise


def write_report(rows: list[dict], out_dir: str | os.PathLike, meta: dict) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    ``rows`` holds one dict per variant, the baseline first; every key but
    ``name`` may be missing or None. ``meta`` describes the run (model, data
    fingerprint, versions, date, command line, machine). Returns the paths
    written, keyed "json", "md" and "html".
    """
    rows = [dict(r) for r in rows]  # never mutate the caller's rows
    meta = dict(meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fronts = {
        key: pareto_front([(str(r["name"]), r.get(field), r.get("perplexity")) for r in rows])
        for key, field, *_ in _AXES
    }
    starred = set(fronts["bytes"]) | set(fronts["latency"])
    cols = _columns(rows)

    # Render everything before touching the disk: a failure here writes nothing.
    docs = {
        "report.json": _render_json(rows, meta, fronts),
        "report.md": _render_md(rows, meta, fronts, cols, starred),
        "report.html": _render_html(rows, meta, fronts, cols, starred, _figures(rows, fronts)),
    }
    _write_all(out, docs)
    return {name.split(".")[1]: out / name for name in FILES}
