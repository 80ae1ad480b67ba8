"""What every onnxlr HTML page shares (the report of ``--html``, ``onnxlr tune``'s page): the style, the
page template, inline SVG plots from matplotlib, and small formatters. Nothing is fetched: the CSS is
inline, the plots are inline SVG, and a Content-Security-Policy forbids loading anything."""

from __future__ import annotations

import html
import io
import re

ORIGINAL, OPTIMIZED, ACCENT = "#a3acb9", "#2f6db5", "#d9822b"
RC = {"svg.fonttype": "path", "svg.hashsalt": "onnxlr", "font.size": 9, "axes.titlesize": 10,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "axes.axisbelow": True, "legend.frameon": False}
CSS = """
body { margin: 0; background: #f4f6f8; color: #1f2933; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.paths { color: #52606d; margin: 0 0 14px; word-break: break-all; } .muted { color: #7b8794; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 8px 12px; min-width: 120px; flex: 1 1 auto; }
.card .k { color: #7b8794; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 17px; font-weight: 600; white-space: nowrap; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 14px; }
.PASSED { background: #2f9e44; } .FAILED { background: #c92a2a; } .none { background: #9aa5b1; }
figure { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; margin: 16px 0; padding: 12px; }
.row { display: flex; flex-wrap: wrap; gap: 0 16px; } .row figure { flex: 1 1 420px; }
figure svg { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: #52606d; font-size: 13px; margin-top: 6px; text-align: center; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #e4e7eb; font-size: 13px; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e4e7eb; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
ul { margin: 4px 0; padding-left: 20px; } code { font-size: 12px; word-break: break-all; }
td.alarm { background: #ffe3e3; color: #c92a2a; font-weight: 600; }
#alarms { background: #fff5f5; border: 1px solid #ffa8a8; border-radius: 8px; padding: 4px 14px; }
#alarms h2 { color: #c92a2a; margin-top: 10px; }
"""
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><main>
{body}
</main></body></html>
"""


def escape(value) -> str:
    return html.escape(str(value))


def ms(value: float) -> str:
    return f"{value:.3g}"


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:,.0f} B"


def share(new: float, old: float) -> str:
    return f"{new / old:.1%} of original" if old else "n/a"


def provider_label(p: dict, newline: str = "\n", options: bool = False) -> str:
    """A provider as a short label, ``OpenVINO`` (``[device_type=GPU]`` with ``options``) and its device."""
    given = ",".join(f"{k}={v}" for k, v in p["options"].items()) if options else ""
    return p["provider"].removesuffix("ExecutionProvider") + (f"[{given}]" if given else "") + newline + p["device"]


def wrap(text: str, width: int = 16) -> str:
    """``text`` on lines of about ``width`` characters, broken after slashes and spaces."""
    lines = [""]
    for piece in filter(None, re.findall(r"[^/ ]*[/ ]?", text)):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines)


def svg(fig, key: str) -> str:
    """``fig`` as inline SVG; ids prefixed with ``key`` so that several plots share one document."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r'(\bid="|href="#|url\(#)', rf"\g<1>{key}-", svg)


def figure(key: str, fig, caption: str) -> str:
    return f'<figure id="{key}">{svg(fig, key)}<figcaption>{escape(caption)}</figcaption></figure>'


def table(head: list[str], rows: list[str], key: str) -> str:
    """A table with id ``key``: header cells ``head``, body rows already rendered (``<tr>…</tr>``)."""
    return (f'<table id="{key}"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
