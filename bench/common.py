"""What every benchmark script shares: its command-line options, the machine line of its section, the
LeNet accuracy table, and writing its section into docs/benchmarks.md between begin/end marks."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
from pathlib import Path

import onnxruntime as ort

from onnxlr.models import metrics
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.latency_cache import cpu_model
from onnxlr.runtimes.providers import make_session

THREADS = 2


def machine(threads: int = THREADS) -> str:
    """onnxruntime version, provider, threads, cores and the CPU (with or without AVX-512 VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    vnni = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else "no VNNI"
    return (f"onnxruntime {ort.__version__}, CPUExecutionProvider, {threads} threads, {os.cpu_count()} cores, "
            f"{cpu_model()} ({vnni})")


def lenet_rows(models: dict, images, labels, columns: dict) -> list[str]:
    """One table row per model of ``models`` (label -> serialized model, first the original): held-out
    accuracy and top-1 agreement with the first, after the cells ``columns[label]`` (a list of str)."""
    reference, rows = None, []
    for label, blob in models.items():
        logits = make_session(blob, "CPUExecutionProvider", THREADS).run(None, {"image": images})[0]
        reference = logits if reference is None else reference
        cells = [label, *columns[label], f"{metrics.accuracy(logits, labels):.3f}",
                 f"{metrics.top1_agreement(reference, logits):.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def embedding_cells(reference, blob: bytes, feeds, digits: int = 4) -> list[str]:
    """MiniLM table cells of a model against the original's embeddings ``reference``: mean (worst)
    cosine and top-10 neighbour overlap on ``feeds``."""
    from onnxlr.models import minilm

    emb = minilm.embed(blob, feeds)
    cos = metrics.cosine_rows(reference, emb)
    return [f"{cos.mean():.{digits}f} ({cos.min():.3f})", f"{metrics.topk_overlap(reference, emb, k=10):.3f}"]


def marked(mark: str, lines: list[str]) -> str:
    """A section of docs/benchmarks.md: ``lines`` between ``mark``'s begin and end comments."""
    return "\n".join([f"<!-- {mark}:begin -->", *lines, f"<!-- {mark}:end -->"])


def write_section(doc: Path, body: str, mark: str) -> None:
    """Replace the section of ``doc`` between ``mark``'s begin/end comments (or append it)."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {mark}:begin -->", f"<!-- {mark}:end -->"
    if begin in old and end in old:
        new = old[: old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(new)


def bench_parser(doc: str, mark: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: ``--cache-dir`` and ``--write``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("ONNXLR_CACHE", Path.home() / ".cache" / "onnxlr")))
    parser.add_argument("--write", type=Path, help=f"markdown file whose {mark} section is replaced")
    return parser


def emit(body: str, args: argparse.Namespace, mark: str) -> int:
    """Print a section and, with ``--write``, put it into the markdown file."""
    print(body)
    if args.write:
        write_section(args.write, body, mark)
    return 0


def cache_main(section, doc: str, mark: str, argv=None) -> int:
    """``main`` of a benchmark whose section needs only the cache folder: ``section(cache_dir)``."""
    args = bench_parser(doc, mark).parse_args(argv)
    return emit(section(args.cache_dir), args, mark)


def interleaved_rounds(models: dict[str, tuple[bytes, float]], feeds, count: int, repeats: int,
                       lock: Path | None = None, *, reference: str = "fp32",
                       noise: str = "fp32 (second session: noise pair)") -> list[dict[str, float]]:
    """Per round, label -> median ms of every model of ``models`` (label -> (bytes, build seconds)) and
    of a second session of ``reference`` (the noise pair, labelled ``noise``), interleaved on the CPU
    provider; with ``lock``, timed only while holding that file's lock (``flock``'s lock, for a machine
    shared with other timings: the builds before it do not wait)."""
    sessions = {label: make_session(blob, "CPUExecutionProvider", THREADS) for label, (blob, _) in models.items()}
    sessions[noise] = make_session(models[reference][0], "CPUExecutionProvider", THREADS)
    with open(lock, "a") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        return [{label: t.median_ms for label, t in measure(sessions, feeds, warmup=5, repeats=repeats).items()}
                for _ in range(count)]
