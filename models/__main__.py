"""``python -m onnxlr.models CACHE_DIR``: build all reference models and print
where they are and how they measure (from the builders' metadata JSON files)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import build_all


def _summary(cache_dir: Path) -> list[str]:
    def meta(name: str) -> dict:
        return json.loads((cache_dir / name).read_text())

    t, m, d = meta("text_splits.json"), meta("minilm.json"), meta("mnist_lenet.json")
    return [
        f"text:   {t['n_calib']} calibration + {t['n_eval']} evaluation sentences "
        f"(of {t['corpus_sentences']}, Python {t['python']}), {t['max_length']} tokens",
        f"minilm: {m['torch_parameters']:,} parameters ({m['onnx_parameters']:,} in the graph), "
        f"{m['weight_matmuls']} weight MatMuls, opset {m['opset']}, "
        f"torch/ORT max abs diff {m['torch_ort_max_abs_diff']:.2e}, built in {m['build_seconds']:.1f}s",
        f"mnist:  test accuracy {d['test_accuracy']:.3f} (ORT) on {d['split']['test']} digits, "
        f"{d['torch_parameters']:,} parameters, built in {d['build_seconds']:.1f}s",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxlr.models", description=__doc__)
    parser.add_argument("cache_dir", type=Path, help="folder for the built models and data")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_all(args.cache_dir)
    for name, path in paths.items():
        print(f"{name:11s} {path}")
    for line in _summary(args.cache_dir):
        print(line)
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
