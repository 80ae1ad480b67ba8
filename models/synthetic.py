"""Synthetic transformer and CNN stacks of any size, for the scaling benchmark (bench/scaling.py).

The weights are random (Gaussian, scaled by 1/sqrt(fan-in)): what is measured is the optimizer's cost,
which depends on the shapes, not on what the weights learned. Each weight is written straight into
the external data file as it is drawn, so a model larger than memory can be built.

    python -m onnxlr.models.synthetic transformer --width 2048 --blocks 20 -o big.onnx    # ~1.0B params, 4 GB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17


class _Weights:
    """Initializers written one by one into ``<model>.data`` (aligned like onnxlr's own writer)."""

    def __init__(self, model_path: Path, seed: int):
        self.location = model_path.name + ".data"
        self.file = open(model_path.parent / self.location, "wb")
        self.rng = np.random.default_rng(seed)
        self.initializers: list[onnx.TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], fan_in: int | None = None) -> str:
        if fan_in is None:  # a bias or norm scale: small, embedded
            values = (0.01 * self.rng.standard_normal(shape)).astype(np.float32)
            self.initializers.append(onnx.numpy_helper.from_array(values, name))
            return name
        offset = -self.file.tell() % 4096 + self.file.tell()
        self.file.write(b"\0" * (offset - self.file.tell()))
        rows = max(1, (64 * 1024**2) // (4 * int(np.prod(shape[1:]))))  # draw in ~64 MB slabs
        for start in range(0, shape[0], rows):
            slab = self.rng.standard_normal((min(rows, shape[0] - start), *shape[1:]), dtype=np.float32)
            slab *= np.float32(1.0 / np.sqrt(fan_in))
            self.file.write(slab.tobytes())
        tensor = TensorProto(name=name, dims=shape, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(4 * int(np.prod(shape))))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def transformer_stack(path: str | Path, *, width: int, blocks: int, ffn: int = 4, tokens: int = 16,
                      seed: int = 0) -> Path:
    """Pre-norm transformer blocks (single-head attention, ReLU MLP) on ``[batch, tokens, width]``:
    ``12 width²`` MatMul parameters per block. Returns the model path (weights in ``path.data``)."""
    path = Path(path)
    weights = _Weights(path, seed)
    nodes, x = [], "x"
    for b in range(blocks):
        p = f"block{b}"
        h = f"{p}/ln1"
        nodes.append(helper.make_node("LayerNormalization", [x, weights.add(f"{p}/ln1.scale", (width,)),
                                                             weights.add(f"{p}/ln1.bias", (width,))], [h], axis=-1))
        for proj in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [h, weights.add(f"{p}/W{proj}", (width, width), width)],
                                          [f"{p}/{proj}"], name=f"{p}/{proj}"))
        nodes += [
            helper.make_node("Transpose", [f"{p}/k"], [f"{p}/kT"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}/q", f"{p}/kT"], [f"{p}/scores"]),
            helper.make_node("Softmax", [f"{p}/scores"], [f"{p}/attn"], axis=-1),
            helper.make_node("MatMul", [f"{p}/attn", f"{p}/v"], [f"{p}/mixed"]),
            helper.make_node("MatMul", [f"{p}/mixed", weights.add(f"{p}/Wo", (width, width), width)],
                             [f"{p}/o"], name=f"{p}/o"),
            helper.make_node("Add", [x, f"{p}/o"], [f"{p}/res1"]),
            helper.make_node("LayerNormalization", [f"{p}/res1", weights.add(f"{p}/ln2.scale", (width,)),
                                                    weights.add(f"{p}/ln2.bias", (width,))], [f"{p}/ln2"], axis=-1),
            helper.make_node("MatMul", [f"{p}/ln2", weights.add(f"{p}/W1", (width, ffn * width), width)],
                             [f"{p}/up"], name=f"{p}/up"),
            helper.make_node("Relu", [f"{p}/up"], [f"{p}/act"]),
            helper.make_node("MatMul", [f"{p}/act", weights.add(f"{p}/W2", (ffn * width, width), ffn * width)],
                             [f"{p}/down"], name=f"{p}/down"),
            helper.make_node("Add", [f"{p}/res1", f"{p}/down"], [f"{p}/out"]),
        ]
        x = f"{p}/out"
    weights.close()
    graph = helper.make_graph(nodes, f"transformer_{width}x{blocks}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", tokens, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", tokens, width])],
                              weights.initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def cnn_stack(path: str | Path, *, channels: int, layers: int, size: int = 32, seed: int = 0) -> Path:
    """``layers`` 3×3 convolutions (``channels`` in and out, bias, ReLU) on ``[batch, channels, size,
    size]``: ``9 channels²`` parameters each."""
    path = Path(path)
    weights = _Weights(path, seed)
    nodes, x = [], "x"
    for i in range(layers):
        W = weights.add(f"conv{i}.weight", (channels, channels, 3, 3), 9 * channels)
        nodes += [helper.make_node("Conv", [x, W, weights.add(f"conv{i}.bias", (channels,))], [f"c{i}"],
                                   name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    weights.close()
    graph = helper.make_graph(nodes, f"cnn_{channels}x{layers}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", channels, size, size])],
                              weights.initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("transformer", "cnn"))
    parser.add_argument("--width", type=int, default=256, help="transformer width / CNN channels")
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks / CNN layers")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.kind == "transformer":
        transformer_stack(args.output, width=args.width, blocks=args.blocks)
    else:
        cnn_stack(args.output, channels=args.width, layers=args.blocks)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
