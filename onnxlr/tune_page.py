"""The manifest of ``onnxlr tune`` as one self-contained HTML page: per target, latency against error and
size against error of every candidate tried (the pick marked), and the table of candidates with why
each was dropped or not picked. Built like the optimization report's page (:mod:`onnxlr.html_report`)."""

from __future__ import annotations

from onnxlr.html_page import (ACCENT, CSS, OPTIMIZED, ORIGINAL, PAGE, RC, escape as _e, figure as _figure,
                              size as _bytes, table as _table)


def render(manifest: dict) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        plots = [_pareto(manifest, target, Figure, index) for index, target in enumerate(manifest["targets"])]
    body = [_summary(manifest), *(f'<div class="row">{p}</div>' for p in plots if p), _candidates(manifest)]
    name = manifest["model"].rsplit("/", 1)[-1]
    return PAGE.format(title=_e(f"onnxlr tune: {name}"), css=CSS, body="\n".join(b for b in body if b))


def _summary(manifest: dict) -> str:
    rows = []
    for t in manifest["targets"]:
        pick = t["pick"]
        if pick is None:
            rows.append(f"<tr><td>{_e(t['provider'])}</td><td>{_e(t['device'])}</td><td colspan=\"4\" "
                        f"class=\"muted\">{_e(t['reason'])}</td></tr>")
            continue
        noise = pick.get("speedup_noise")
        shown = f"{pick['speedup']:.2f}×" + (f' <span class="muted">(±{noise:.0%})</span>' if noise is not None else "")
        rows.append(f"<tr><td>{_e(t['provider'])}</td><td>{_e(t['device'])}</td><td><b>{_e(pick['candidate'])}</b> "
                    f"<code>{_e(pick['file'])}</code></td><td class=\"num\">{shown}</td>"
                    f"<td class=\"num\">{_bytes(pick['bytes'])}</td><td>{_e(', '.join(pick['tied_with']) or '-')}</td></tr>")
    checks = "".join(f"<li>{_e(c['device'])}: {_e(c['emulated'])}, outputs checked on {c['samples']} samples "
                     "(not timed)</li>" for c in manifest["emulated_checks"])
    settings = manifest["settings"]
    drop = f", task score drop at most {settings['max_drop']:g}" if settings["max_drop"] is not None else ""
    return (f"<h1>onnxlr tune</h1><p class=\"paths\"><code>{_e(manifest['model'])}</code>; tolerance "
            f"{_e(settings['tolerance'] or '-')}{_e(drop)}; "
            f"{manifest['seconds']:.0f} s, {manifest['measurements_made']} measurements made (the rest from the cache)</p>"
            + _table(["provider", "device", "pick", "speed-up", "size", "tied within noise"], rows, "picks")
            + (f"<h2>Emulated devices</h2><ul>{checks}</ul>" if checks else ""))


def _pareto(manifest: dict, target: dict, Figure, index: int) -> str:
    where = f"{target['device']}/{target['provider']}"
    points = []
    for c in manifest["candidates"]:
        entry = c["targets"].get(where)
        if entry and entry.get("median_ms") and entry.get("measured"):
            points.append((c["name"], entry["median_ms"], c["bytes"], max(_distance(v) for v in entry["measured"].values()),
                           entry["holds"]))
    if not points:
        return ""
    pick = (target.get("pick") or {}).get("candidate")
    original = (target.get("original_median_ms"), manifest["model_bytes"])
    fig = Figure(figsize=(9.6, 3.4))
    for ax, column, label in ((fig.add_subplot(1, 2, 1), 0, "latency (ms)"), (fig.add_subplot(1, 2, 2), 1, "size (bytes)")):
        for name, *values, holds in points:
            x, err = values[column], values[2]
            color = ACCENT if name == pick else OPTIMIZED if holds else ORIGINAL
            ax.scatter([x], [err], color=color, s=60 if name == pick else 25, zorder=3)
            ax.annotate(name, (x, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if original[column]:
            ax.scatter([original[column]], [0.0], color=ORIGINAL, marker="*", s=90, zorder=3)
            ax.annotate("original", (original[column], 0.0), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("error (tolerance metric, from ideal)")
        ax.set_yscale("symlog", linthresh=1e-4)
    fig.suptitle(f"{target['provider'].removesuffix('ExecutionProvider')} on {target['device']}: "
                 "every candidate timed (orange: the pick; grey: misses the tolerance)", fontsize=9)
    return _figure(f"pareto-{index}", fig,
                   "lower left is better; a candidate is picked only if it meets the tolerance")


def _distance(value: float | None) -> float:
    """A measured tolerance value as a distance from the ideal: agreements and cosines as 1 - value."""
    if value is None:
        return 0.0
    return 1.0 - value if 0.5 <= value <= 1.0 else abs(value)


def _candidates(manifest: dict) -> str:
    rows = []
    for c in manifest["candidates"]:
        size = _bytes(c["bytes"]) if c["bytes"] else "-"
        built = f"{c['build_seconds']:.1f} s" if c["build_seconds"] is not None else "-"
        status = f'<td class="alarm">{_e(c["status"])}</td>' if c["status"] in ("failed", "dropped") else \
            f"<td>{_e(c['status'])}</td>"
        rows.append(f"<tr><td>{_e(c['name'])}</td>{status}<td class=\"num\">{size}</td><td class=\"num\">{built}</td>"
                    f"<td>{_e(c['reason'])}</td></tr>")
    return "<h2>Candidates</h2>" + _table(["candidate", "status", "size", "build", "why"], rows, "candidates")
