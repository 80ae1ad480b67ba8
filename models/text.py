"""Offline text corpus for calibrating and evaluating the MiniLM embedder.

What is built: English sentences taken from the documentation topics that
CPython ships with itself (``pydoc_data.topics.topics``, the text behind
``help("if")`` etc.), split into two disjoint sets:

* calibration (first 256 sentences after a seeded shuffle): activations for
  data-aware low-rank factorization are collected on these;
* evaluation (next 512): the factorized model is judged on these only.

Why this source: it needs no download and no extra package, it is real prose
about a technical subject (so embeddings have meaningful neighbourhoods), and
it is large enough (a few thousand usable sentences). Note that the text comes
from the running interpreter, so a different CPython version gives a somewhat
different corpus; the Python version is recorded in the metadata.

``build_splits`` tokenizes both sets with the all-MiniLM-L6-v2 tokenizer
(padded/truncated to 64 tokens) and writes ``text_calib.npz`` and
``text_eval.npz`` with int64 ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import _common

FORMAT = 1
MIN_CHARS, MAX_CHARS = 40, 300
MIN_WORDS = 6

CALIB_FILE = "text_calib.npz"
EVAL_FILE = "text_eval.npz"
META_FILE = "text_splits.json"

# A line made only of a repeated punctuation character: a reST heading underline.
_RULE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
# Sentence boundary: end punctuation (not of "e.g." / "i.e."), whitespace, then
# something that can start a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z\"'(*])")


def _paragraphs(doc: str):
    """Yield whitespace-normalised prose paragraphs of one help topic.

    Paragraphs are separated by blank lines; line breaks inside a paragraph
    are only hard wrapping. Heading underlines are dropped, and so are
    interactive examples (``>>>``) and grammar rules (``::=``), which are code.
    """
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if not _RULE.match(line)]
        if any(line.lstrip().startswith((">>>", "...")) or "::=" in line for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        if text:
            yield text


# Looks like a whole prose sentence: starts like one, ends with end punctuation.
_WHOLE = re.compile(r"^[A-Z\"'(].*[.!?][)\"']?$")


def _keep(sentence: str) -> bool:
    """Length in range, enough words, a whole sentence, and no table drawing."""
    return (
        MIN_CHARS <= len(sentence) <= MAX_CHARS
        and len(sentence.split()) >= MIN_WORDS
        and _WHOLE.match(sentence) is not None
        and "+--" not in sentence
        and " | " not in sentence
    )


def sentences(seed: int = 0) -> list[str]:
    """All usable corpus sentences, deduplicated, sorted, then shuffled.

    The order depends only on ``seed`` (numpy ``default_rng(seed)``) and the
    CPython version that supplies the docs.
    """
    from pydoc_data.topics import topics

    found = set()
    for key in sorted(topics):
        for paragraph in _paragraphs(topics[key]):
            for s in _SENTENCE_END.split(paragraph):
                s = s.strip()
                if s.startswith("* "):  # list bullet
                    s = s[2:]
                if _keep(s):
                    found.add(s)
    ordered = sorted(found)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order]


def split(n_calib: int = 256, n_eval: int = 512, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, evaluation) sentence lists: the first ``n_calib``
    shuffled sentences, then the next ``n_eval``."""
    pool = sentences(seed)
    if n_calib + n_eval > len(pool):
        raise ValueError(f"asked for {n_calib}+{n_eval} sentences, corpus has {len(pool)}")
    return pool[:n_calib], pool[n_calib:n_calib + n_eval]


def tokenize(sentences: list[str], max_length: int = 64) -> dict[str, np.ndarray]:
    """Tokenize with the all-MiniLM-L6-v2 tokenizer.

    Returns ``input_ids`` and ``attention_mask``, both int64 of shape
    ``[len(sentences), max_length]`` (padded with [PAD]=0 / truncated, with
    [CLS] first and [SEP] last among the real tokens).
    """
    from .minilm import load_tokenizer

    enc = load_tokenizer()(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def build_splits(cache_dir: Path, max_length: int = 64) -> tuple[Path, Path]:
    """Write ``text_calib.npz`` and ``text_eval.npz`` (and ``text_splits.json``,
    which also holds the raw sentences) into ``cache_dir``; reuse them if complete."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    calib_path, eval_path, meta_path = cache_dir / CALIB_FILE, cache_dir / EVAL_FILE, cache_dir / META_FILE
    meta = _common.cached_metadata(meta_path, [calib_path, eval_path], FORMAT)
    if meta is not None and meta.get("max_length") == max_length:
        return calib_path, eval_path

    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    calib, evals = split()
    _common.write_npz(calib_path, **tokenize(calib, max_length))
    _common.write_npz(eval_path, **tokenize(evals, max_length))
    _common.write_json(meta_path, {
        "complete": True,
        "format": FORMAT,
        "source": "pydoc_data.topics.topics",
        "python": sys.version.split()[0],
        "corpus_sentences": len(sentences()),
        "seed": 0,
        "max_length": max_length,
        "n_calib": len(calib),
        "n_eval": len(evals),
        "calib_sha256": _digest(calib),
        "eval_sha256": _digest(evals),
        "calib_sentences": calib,
        "eval_sentences": evals,
        "build_seconds": round(time.perf_counter() - start, 3),
        "files": _common.file_sizes([calib_path, eval_path]),
    })
    return calib_path, eval_path


def load(path: Path) -> dict[str, np.ndarray]:
    """Read a ``text_*.npz`` file back into a feeds dict."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
