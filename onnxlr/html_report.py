"""The optimization report (``Report.to_dict()``) as one self-contained HTML page (``--html``).

Nothing is fetched: the CSS is inline, the plots are inline SVG drawn by matplotlib, and a
Content-Security-Policy forbids loading anything. Sections whose data the report lacks (no
validation, no profile, no mobile checks…) are left out. Fields: docs/report.md.
"""

from __future__ import annotations

import re

from onnxlr.html_page import (ACCENT, CSS, OPTIMIZED, ORIGINAL, PAGE, RC, escape as _e, figure as _figure,
                              ms as _ms, provider_label as _label, share as _share, size as _bytes, table as _table,
                              wrap as _wrap)
from onnxlr.report import ALARMS


PROFILE_LAYERS_SHOWN = 20

def render(report: dict) -> str:
    """The HTML page of ``report``: the dict of ``Report.to_dict()`` (or a Report), or the JSON of ``--report``."""
    report = report.to_dict() if hasattr(report, "to_dict") else report
    import matplotlib  # imported here: the plotting stack costs a second at start-up
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    with matplotlib.rc_context(RC):
        latency, size, layers, kernels = (f(report, Figure) for f in (_latency, _size, _layers, _kernels))
    # small plots two by two; the per-layer ones of a model with many layers at full width
    few = len(_layer_rows(report)) <= 8 and len(_profile_rows(report)[0]) <= 8
    plots = [latency + size, *((layers + kernels,) if few else (layers, kernels))]
    body = [_summary(report), _alarms(report), *(f'<div class="row">{p}</div>' for p in plots if p),
            _providers(report), _mobile(report), _ort_format(report), _warnings(report), _skipped(report),
            _settings(report)]
    name = (report["optimized"].get("path") or report["original"].get("path") or "model").rsplit("/", 1)[-1]
    return PAGE.format(title=_e(f"onnxlr report: {name}"), css=CSS, body="\n".join(b for b in body if b))


def _ran(report: dict) -> list[dict]:
    """The provider results where both models ran."""
    v = report.get("validation") or {}
    return [p for p in v.get("providers", []) if p["available"] and not p["reason"] and p["latency_original"]
            and p["latency_optimized"]]


def _summary(report: dict) -> str:
    o, n = report["original"], report["optimized"]
    passed = report.get("passed")
    verdict = "none" if passed is None else "PASSED" if passed else "FAILED"
    tolerance = report.get("tolerance") or "no --max-error given"
    written = (f" (written to <code>{_e(n['path'])}</code>)" if report.get("written")
               else " (not written)" if report["passes"] else "")
    cards = [("parameters", f"{o['params']:,} → {n['params']:,}", _share(n["params"], o["params"])),
             ("bytes", f"{o['bytes']:,} → {n['bytes']:,}", _share(n["bytes"], o["bytes"])),
             ("nodes", f"{o['nodes']:,} → {n['nodes']:,}", "")]
    speedups = [(p, p["speedup"]) for p in _ran(report) if p.get("speedup")]
    if speedups:
        p, s = speedups[0]
        cards.append(("speed-up", f"{s:.2f}×", _label(p, " on ")))
    cards.append(("tolerance", f'<span class="badge {verdict}">{verdict if passed is not None else "not checked"}</span>',
                  tolerance))
    html_cards = "".join(f'<div class="card" id="card-{k.replace(" ", "-")}"><div class="k">{k}</div>'
                         f'<div class="v">{v}</div><div class="muted">{_e(r)}</div></div>'
                         for k, v, r in cards)
    passes = " · ".join(f"{_e(p['name'])}: {sum(c['action'] == 'rewritten' for c in p['layers'])} rewritten, "
                        f"{sum(c['action'] == 'skipped' for c in p['layers'])} skipped" for p in report["passes"])
    return (f'<header id="summary"><h1>onnxlr report</h1><p class="paths"><code>{_e(o["path"] or "original")}</code>'
            f' → <code>{_e(n["path"] or "optimized")}</code>{written}</p><div class="cards">{html_cards}</div>'
            + (f'<p class="muted">{passes}</p>' if passes else "") + "</header>")


def _bars(ax, labels, before, after, horizontal=False):
    """Grouped original/optimized bars at integer positions (original first: left, or on top)."""
    import numpy as np

    x, shift = np.arange(len(labels)), -0.19 if not horizontal else 0.19
    draw = ax.barh if horizontal else ax.bar
    draw(x + shift, before, 0.38, label="original", color=ORIGINAL)
    draw(x - shift, after, 0.38, label="optimized", color=OPTIMIZED)
    (ax.set_yticks if horizontal else ax.set_xticks)(x, labels)
    return x


def _latency(report: dict, Figure) -> str:
    ran = _ran(report)
    if not ran:
        return ""
    fig = Figure(figsize=(max(4.0, 1.3 * len(ran) + 1.6), 3.2))
    ax = fig.add_subplot()
    before = [p["latency_original"]["median_ms"] for p in ran]
    after = [p["latency_optimized"]["median_ms"] for p in ran]
    labels = [p["provider"].removesuffix("ExecutionProvider") + "\n" + _wrap(p["device"]) for p in ran]
    if len(set(labels)) < len(labels):  # one provider with several option sets on one device
        labels = [_label(p, options=True).replace(",", ",\n") for p in ran]
    x = _bars(ax, labels, before, after)
    for offset, key, values in ((-0.19, "latency_original", before), (0.19, "latency_optimized", after)):
        ax.errorbar(x + offset, values, yerr=[[0] * len(ran), [p[key]["p90_ms"] - m for p, m in zip(ran, values)]],
                    fmt="none", ecolor="#3e4c59", capsize=3, lw=0.8)
    # a noisy p90 far above every median would flatten the bars: clip it, and say so
    p90 = max(p[k]["p90_ms"] for p in ran for k in ("latency_original", "latency_optimized"))
    top = min(p90, 2.0 * max(before + after))
    for i, p in enumerate(ran):
        ax.text(x[i], top * 1.06, f"{p['speedup']:.2f}×", ha="center", fontsize=9, color=ACCENT, weight="bold")
        for offset, key in ((-0.19, "latency_original"), (0.19, "latency_optimized")):
            if p[key]["p90_ms"] > top:
                ax.text(x[i] + offset, top, f"p90 {_ms(p[key]['p90_ms'])}↑", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top * 1.18)
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left", ncol=2, bbox_to_anchor=(0, 1.12))
    batch = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in report["validation"]["latency_batch"].items())
    return _figure("latency", fig, f"Latency per provider: median of interleaved runs on one batch ({batch}), "
                                   f"whiskers to p90; speed-up = original median / optimized median.")


def _compact(names: list[str], keep: int = 32) -> list[str]:
    """Node names without the path segments they all start with (and, while still longer than ``keep``,
    end with), middle-elided to ``keep`` characters."""
    parts = [n.split("/") for n in names]
    lead = trail = 0
    if len(names) > 1:
        while all(len(p) > lead + trail + 1 and p[lead] == parts[0][lead] for p in parts):
            lead += 1
        while (any(len("/".join(p[lead:len(p) - trail])) > keep for p in parts)
               and all(len(p) > lead + trail + 1 and p[-1 - trail] == parts[0][-1 - trail] for p in parts)):
            trail += 1
    out = ["/".join(p[lead:len(p) - trail]) for p in parts]
    return [n if len(n) <= keep else n[:keep // 2 - 1] + "…" + n[-(keep // 2):] for n in out]


ERRORS = ("calib_error", "calib_error_compensated", "weight_error")


def _rank(d: dict, name: str) -> tuple[float | None, str]:
    """A rewritten layer's rank (the largest of a conv decomposition's) and how to label it
    (``name``: its pass)."""
    if "rank" in d:
        return d["rank"], ""
    if "ranks" in d:
        return max(d["ranks"]), f"{d.get('decomposition', '')} {'/'.join(map(str, d['ranks']))}".strip()
    if "hidden" in d:
        return d["hidden"][1], f"{d['hidden'][0]}→{d['hidden'][1]} units"
    if "bits" in d:
        return None, f"{d['bits']}-bit"
    if "sparsity" in d:
        return None, f"sparsity {d['sparsity']:.0%}"
    if name == "quantize_int8":
        return None, "int8" + (" weights" if d.get("weight_only") else "")
    return None, ""


def _layer_rows(report: dict) -> list[list]:
    """[label, rank, rank label, details, pass name if the node was already rewritten] per rewritten layer."""
    rows, seen = [], set()
    for record in report["passes"]:
        for c in record["layers"]:
            rank, text = _rank(c["details"], record["name"])
            # the layers with figures to show (not, e.g., a folded constant)
            if c["action"] == "rewritten" and (rank is not None or text or any(k in c["details"] for k in ERRORS)):
                rows.append([c["node"], rank, text, c["details"], record["name"] if c["node"] in seen else ""])
                seen.add(c["node"])
    for row, label in zip(rows, _compact([r[0] for r in rows])):  # rank-less layers: their format in the label
        row[0] = label + (f" ({row[4]})" if row[4] else "") + (f" [{row[2]}]" if row[1] is None and row[2] else "")
    return rows


def _layers(report: dict, Figure) -> str:
    rows = _layer_rows(report)
    if not rows:
        return ""
    fig = Figure(figsize=(min(14.0, max(4.5, 0.34 * len(rows) + 2.5)), 3.6 if len(rows) <= 8 else 4.2))
    ax = fig.add_subplot()
    x = range(len(rows))
    ax.set_xticks(list(x), [r[0] for r in rows], rotation=40, ha="right", fontsize=7)
    err = ax
    if any(r[1] is not None for r in rows):  # ranks on the left axis, errors on the right
        units = any("hidden" in r[3] for r in rows)
        ax.bar(x, [r[1] or 0 for r in rows], 0.6, color=OPTIMIZED, label="rank (hidden units kept)" if units else "rank")
        for i, (_, rank, text, _, _) in enumerate(rows):
            if text and rank is not None:
                ax.text(i, rank, text, rotation=90, ha="center", va="bottom", fontsize=7, color="#3e4c59")
        ax.set_ylabel("rank")
        ax.set_ylim(0, max(r[1] or 0 for r in rows) * 1.35 or 1)
        err = ax.twinx()
        err.spines["right"].set_visible(True)
        err.grid(False)
    for key, marker, color, name in (("calib_error", "o", ACCENT, "output error (calibration data)"),
                                     ("calib_error_compensated", "v", "#8e44ad", "output error, compensated"),
                                     ("weight_error", "s", "#3e4c59", "weight error")):
        points = [(i, r[3][key]) for i, r in enumerate(rows) if r[3].get(key) is not None]
        if points:
            err.plot(*zip(*points), marker, color=color, label=name, ms=5, ls="none")
    err.set_ylim(bottom=0)
    err.set_ylabel("relative error")
    handles = [h for a in {ax: 0, err: 0} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", ncol=4, fontsize=8,
              bbox_to_anchor=(0, 1.13))
    return _figure("layers", fig, "Per-layer rank and error: the kept rank of each rewritten layer (conv "
                                  "decompositions: the largest rank, labelled; quantized layers have none) and "
                                  "its relative errors, output on the calibration data and weight ‖W − W′‖/‖W‖.")


def _size(report: dict, Figure) -> str:
    o, n = report["original"], report["optimized"]
    fig = Figure(figsize=(5.4, 2.6))
    for i, (key, title, fmt) in enumerate((("params", "parameters", lambda v: f"{v:,}"),
                                           ("bytes", "serialized size", _bytes))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.barh([1, 0], [o[key], n[key]], 0.6, color=[ORIGINAL, OPTIMIZED])
        ax.set_yticks([1, 0], ["original", "optimized"])
        ax.set_xlim(0, max(o[key], n[key], 1) * 1.55)
        ax.set_xticks([])
        ax.set_title(title)
        for y, v in ((1, o[key]), (0, n[key])):
            ax.text(v, y, f" {fmt(v)}" + (f" ({v / o[key]:.0%})" if y == 0 and o[key] else ""), va="center", fontsize=8)
    fig.tight_layout()
    return _figure("size", fig, "Size: parameters and serialized bytes, original and optimized.")


def _profile_rows(report: dict) -> tuple[list[tuple], str, dict | None]:
    """(name, before ms, after ms) per rewritten layer of the (local) CPU profile, or per op type if
    no layer kept its name; what they are; the provider result."""
    cpu = [p for p in _ran(report) if p["provider"] == "CPUExecutionProvider" and p.get("profile")]
    if not cpu:
        return [], "", None
    p = next((p for p in cpu if p["device"] == "local"), cpu[0])
    if p["profile"]["layers"]:
        shown = p["profile"]["layers"][:PROFILE_LAYERS_SHOWN]
        return (list(zip(_compact([t["node"] for t in shown], 40), [t["before_ms"] for t in shown],
                         [t["after_ms"] for t in shown])),
                "per rewritten layer (the layer's node before; the nodes that replaced it after)", p)
    return ([(op, a, b) for op, (a, b) in p["profile"]["by_op"].items()],
            "per op type (no rewritten layer kept its name in ONNX Runtime's profile)", p)


def _kernels(report: dict, Figure) -> str:
    rows, what, p = _profile_rows(report)
    if not rows:
        return ""
    profile = p["profile"]
    fig = Figure(figsize=(5.6, 0.32 * len(rows) + 1.4))
    ax = fig.add_subplot()
    _bars(ax, [r[0] for r in rows][::-1], [r[1] for r in rows][::-1], [r[2] for r in rows][::-1], horizontal=True)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("kernel time (ms)")
    ax.legend(loc="lower left", ncol=2, bbox_to_anchor=(0, 1.0))
    before, after = profile["total_ms"]
    return _figure("kernels", fig, f"Kernel time {what} on {_label(p, ' ')}, medians of ONNX Runtime's profile; "
                                   f"all kernels {_ms(before)} → {_ms(after)} ms.")


def _providers(report: dict) -> str:
    v = report.get("validation")
    if not v:
        return ""
    rows, ran = [], [id(p) for p in _ran(report)]
    for p in v["providers"]:
        options = ", ".join(f"{k}={v}" for k, v in p["options"].items())
        who = (f"<td>{_e(p['device'])}</td><td>{_e(p['onnxruntime'])}</td><td>{_e(p['provider'])}"
               + (f" <span class=\"muted\">{_e(options)}</span>" if options else "") + "</td>")
        if id(p) not in ran and not p.get("emulated"):
            rows.append(f'<tr>{who}<td colspan="9" class="muted">{_e(p["reason"] or "not run")}</td></tr>')
            continue
        span = f' rowspan="{max(1, len(p["outputs"]))}"'
        if p.get("emulated"):  # outputs compared, nothing timed
            lat = (f'<td colspan="3" class="muted"{span}>emulated ({_e(p["emulated"])}): not a timing of '
                   f'the device</td>')
        else:
            lat = "".join(f'<td class="num"{span}>{_ms(p[k]["median_ms"])} <span class="muted">({_ms(p[k]["p90_ms"])})</span></td>'
                          for k in ("latency_original", "latency_optimized"))
            noise = p.get("speedup_noise")
            shown = f'{p["speedup"]:.2f}×' + (f' <span class="muted">(±{noise:.0%})</span>' if noise is not None else "")
            lat += f'<td class="num"{span}>{shown}</td>'
        lead = re.sub(r"<td>", f"<td{span}>", who) + lat
        for i, c in enumerate(p["outputs"] or [None]):
            rows.append(f"<tr>{lead if i == 0 else ''}{_output_cells(c)}</tr>")
    head = ["device", "onnxruntime", "provider", "original ms (p90)", "optimized ms (p90)", "speed-up", "output",
            "max abs", "rel L2", "cosine", "worst-sample cosine"]
    batch = ", ".join(f"{_e(k)} {'×'.join(map(str, s))}" for k, s in v["latency_batch"].items())
    return (f'<section><h2>Providers</h2><p class="muted">{v["samples"]:,} samples from <code>{_e(v["inputs"])}</code>, '
            f'{v["threads"]} threads, latency batch {batch}.</p>{_table(head, rows, "providers")}</section>')


def _output_cells(c: dict | None) -> str:
    """An output's agreement cells; a figure past its alarm bound (:data:`onnxlr.report.ALARMS`) is marked."""
    if c is None:
        return '<td colspan="5"></td>'
    if c.get("agreement") is not None:
        return (f"<td>{_e(c['name'])}</td>" + f'<td class="num{_alarm(c, "agreement")}" colspan="4">'
                f"{c['agreement']:.4f} of elements equal</td>")
    cells = "".join(f'<td class="num{_alarm(c, k)}">{_num(c[k], f)}</td>' for k, f in
                    (("max_abs", ".3g"), ("rel_l2", ".3g"), ("cosine", ".5f"), ("cosine_min", ".5f")))
    return f"<td>{_e(c['name'])}</td>" + cells


def _num(value, form: str) -> str:
    return "—" if value is None else f"{value:{form}}"


def _alarm(c: dict, key: str) -> str:
    """`` alarm`` when ``c[key]`` is past its bound (for a class attribute), else ""."""
    if key not in ALARMS or c.get(key) is None:
        return ""
    _, bound, side = ALARMS[key]
    return " alarm" if (c[key] < bound if side == "below" else c[key] > bound) else ""


def _alarms(report: dict) -> str:
    items = report.get("alarms") or []
    if not items:
        return ""
    note = "" if report.get("tolerance") else (
        '<p class="muted">No --max-error was given: the result was written all the same.</p>')
    return ('<section id="alarms"><h2>Look before you use this result</h2><ul>'
            + "".join(f"<li>{_e(a)}</li>" for a in items) + f"</ul>{note}</section>")


def _settings(report: dict) -> str:
    settings = report.get("settings") or {}
    if not settings:
        return ""
    rows = []
    for group, value in settings.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, item in items:
            if item in (None, {}, [], "") and key:
                continue
            rows.append(f"<tr><td>{_e(group)}</td><td>{_e(key)}</td><td><code>{_e(item)}</code></td></tr>")
    return '<section><h2>Settings</h2>' + _table(["group", "setting", "value"], rows, "settings") + "</section>"


def _mobile(report: dict) -> str:
    checks = (report.get("validation") or {}).get("mobile") or []
    if not checks:
        return ""

    def part(p):
        return f"<td>{p['partitions']} partition(s), {p['supported_nodes']}/{p['nodes']} nodes, {_e(p['suitability'])}</td>"
    rows = [f"<tr><td>{_e(c['target'])}</td>{part(c['original'])}{part(c['optimized'])}"
            f"<td>{_e(', '.join(sorted(set(c['optimized']['unsupported_ops']) - set(c['original']['unsupported_ops']))) or '—')}</td>"
            f"<td>{_e('; '.join(c['warnings']) or '—')}</td></tr>" for c in checks]
    return ('<section><h2>Mobile providers (static check, not run)</h2>'
            + _table(["target", "original", "optimized", "new unsupported ops", "warnings"], rows, "mobile") + "</section>")


def _ort_format(report: dict) -> str:
    f = report.get("ort_format")
    if not f:
        return ""
    diff = f.get("max_abs_diff")
    state = (f"loads and runs, max abs difference from the .onnx {diff:.3g}" if f["ok"] and diff is not None
             else "ran" if f["ok"] else f"failed: {f['reason']}")
    return (f'<section id="ort-format"><h2>ORT format</h2><p><code>{_e(f["path"])}</code>, {_bytes(f["bytes"])}: '
            f"{_e(state)}</p></section>")


def _warnings(report: dict) -> str:
    v = report.get("validation") or {}
    items = list(v.get("warnings", []))
    for p in v.get("providers", []):
        if p.get("lost_fusions"):
            lost = ", ".join(f"{op} {a} → {b}" for op, (a, b) in p["lost_fusions"].items())
            items.append(f"ONNX Runtime fusions lost on {_label(p, ' ')}: {lost}")
    if not items:
        return ""
    return '<section id="warnings"><h2>Warnings</h2><ul>' + "".join(f"<li>{_e(w)}</li>" for w in items) + "</ul></section>"


def _skipped(report: dict) -> str:
    """Every layer a pass left alone, with the reason."""
    rows = [f'<tr><td>{_e(record["name"])}</td><td><code>{_e(c["node"])}</code></td><td>{_e(c["op"])}</td>'
            f"<td>{_e(c['reason'])}</td></tr>"
            for record in report["passes"] for c in record["layers"] if c["action"] == "skipped"]
    if not rows:
        return ""
    return ('<section><h2>Skipped layers</h2>' + _table(["pass", "node", "op", "reason"], rows, "skipped")
            + "</section>")
