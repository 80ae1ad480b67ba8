"""Run ONNX models on execution providers and return their outputs, latencies and per-node profiles.

This file needs only Python 3.8+, numpy and onnxruntime — never onnxlr — so it runs where onnxlr is
not installed: a board over ssh, a phone over adb, or a virtual environment holding a different
onnxruntime build (``onnxruntime-openvino`` replaces the ``onnxruntime`` module, so it cannot share
onnxlr's environment). onnxlr imports it for local runs and ships its source to other environments.

By hand::

    python runner.py model.onnx [other.onnx …] --inputs x.npz [--providers all] [--out result.json]

prints (or writes) a JSON document: the onnxruntime version, the providers of that build and, per
provider and model, latency (median, p90 in ms), per-node profile and outputs (base64 ``.npz``).

Through a command prefix (``onnxlr validate --device …``): onnxlr starts
``PREFIX python -c BOOTSTRAP``; BOOTSTRAP reads this file's source from the first stdin line and
calls :func:`serve`, which reads one request line and writes one response line, both base64 text so
that ssh / adb pseudo-terminals cannot mangle them. The response line starts with ``RESPONSE_TAG``
so that anything else a remote shell prints is ignored.
"""

import base64
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

RESPONSE_TAG = "ONNXLR-RUNNER-RESPONSE "
ALL = "all"
# Providers of a build that are not a device to validate on: Azure calls a remote inference endpoint.
NOT_DEVICES = {"AzureExecutionProvider": "calls a remote inference endpoint; not a local device"}


# architecture families: a 32-bit userland on a 64-bit kernel of the same family is not emulated
_FAMILY = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm", "arm64": "arm",
           "armv7l": "arm", "armv8l": "arm", "armv6l": "arm", "riscv64": "riscv", "ppc64le": "ppc", "s390x": "s390"}


def emulation():
    """What emulates this Python ("" on real hardware): the device wrapper's word (``ONNXLR_EMULATED``,
    set by runtimes/build_arm64_device.sh), else QEMU user mode's tell: it fakes uname() for the guest
    but not the kernel's own /proc/sys/kernel/arch."""
    said = os.environ.get("ONNXLR_EMULATED", "")
    if said:
        return said
    try:
        with open("/proc/sys/kernel/arch") as f:
            kernel = f.read().strip()
    except OSError:  # not Linux, or a kernel without that file
        return ""
    machine = platform.machine()
    if kernel and _FAMILY.get(kernel, kernel) != _FAMILY.get(machine, machine):
        return f"user-mode emulation ({machine} on a {kernel} kernel)"
    return ""


def measure_latency(sessions, feeds, warmup=3, repeats=20):
    """Median and p90 wall time (ms) of ``session.run(None, feeds)`` for each session in ``sessions``
    (label -> session), runs interleaved (A B A B …) after a warm-up so slow drifts of the machine hit
    every model alike."""
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feeds)
    times = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[label].append((time.perf_counter() - start) * 1000.0)
    return {label: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": len(t),
                    "times_ms": [round(x, 6) for x in t]}
            for label, t in times.items()}


def default_options(provider, threads):
    """Provider options onnxlr sets unless the user gives them: each provider's own thread pool sized
    like the CPU provider's, so latencies compare at the same core count."""
    if provider == "XnnpackExecutionProvider":
        return {"intra_op_num_threads": str(threads)}
    if provider == "OpenVINOExecutionProvider":
        return {"device_type": "CPU", "num_of_threads": str(threads)}
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return {"device_id": "0"}
    return {}


def session_options(provider, options, threads):
    """The options a session gets: :func:`default_options` under the user's ``options``."""
    return {**default_options(provider, threads), **(options or {})}


def session(model, provider, options=None, threads=1, profile_prefix=None):
    """An InferenceSession of ``model`` (bytes or path) on ``provider`` with its ``options`` (over
    :func:`default_options`).

    Other providers fall back to CPU for the nodes they do not take, as ONNX Runtime does by itself.
    """
    so = ort.SessionOptions()
    # XNNPACK runs its own thread pool; ORT's would only compete with it for the same cores
    so.intra_op_num_threads = 1 if provider == "XnnpackExecutionProvider" else threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # a failing run is reported in onnxlr's words, not as ORT log lines
    # Sessions are timed interleaved (measure_latency): a spinning idle pool of one session would keep a
    # core from the next (8 sessions of MiniLM: fp32 timed 3.2x slower with spinning on).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = [(provider, session_options(provider, options, threads))]
    if provider != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(model, sess_options=so, providers=providers)


def batches(feeds, batch_size):
    """Split ``feeds`` along axis 0 into batches of ``batch_size`` when every input has the same
    leading length; otherwise yield the feeds whole."""
    lengths = {v.shape[0] if v.ndim else None for v in feeds.values()}
    if len(lengths) != 1 or None in lengths:
        yield feeds
        return
    (n,) = lengths
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in feeds.items()}


def dense(value):
    """An output as an array: a tensor as it is; a sequence of maps (a ZipMap's class probabilities) as
    the (rows, keys) matrix of its values over the sorted keys; a sequence of tensors stacked (or joined
    flat when their shapes differ); a map by sorted key; an absent optional as an empty array."""
    if isinstance(value, np.ndarray):
        return value
    if value is None:
        return np.zeros(0, np.float32)
    if isinstance(value, dict):
        return np.asarray([value[k] for k in sorted(value)])
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            keys = sorted(value[0])
            return np.asarray([[row[k] for k in keys] for row in value])
        arrays = [np.asarray(v) for v in value]
        if arrays and all(a.shape == arrays[0].shape for a in arrays):
            return np.stack(arrays)
        return np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
    return np.asarray(value)


def _run_all(sess, feeds, batch_size):
    names = [o.name for o in sess.get_outputs()]
    chunks = [[dense(v) for v in sess.run(None, batch)] for batch in batches(feeds, batch_size)]
    if len(chunks) == 1:
        return dict(zip(names, chunks[0]))
    return {name: np.concatenate([np.atleast_1d(c[i]) for c in chunks]) for i, name in enumerate(names)}


def output_kinds(sess):
    """Output name -> its ONNX type, for the outputs that are not tensors (compared as :func:`dense`)."""
    return {o.name: o.type for o in sess.get_outputs() if not str(o.type).startswith("tensor")}


def profile_nodes(models, provider, options, threads, feeds, runs, warmup=3):
    """Per model (label -> bytes or path) and per node of the graph ONNX Runtime really runs: op, the
    provider it ran on, median kernel ms.

    From ONNX Runtime's own profiler (``enable_profiling``): fresh sessions, run interleaved
    (A B A B …) like the latency, ``warmup`` runs each whose events are dropped (a new session's
    first runs grow its memory arena), then ``runs`` runs of ``feeds``.
    """
    with tempfile.TemporaryDirectory() as folder:
        sessions = {label: session(model, provider, options, threads,
                                   profile_prefix=os.path.join(folder, f"profile_{i}"))
                    for i, (label, model) in enumerate(models.items())}
        for _ in range(warmup + runs):
            for sess in sessions.values():
                sess.run(None, feeds)
        profiles = {}
        for label, sess in sessions.items():
            with open(sess.end_profiling()) as f:
                profiles[label] = _kernel_times(json.load(f), drop=warmup)
    return profiles


def _kernel_times(events, drop):
    """name -> {op, provider, ms}: each node's median kernel time over its events after the first ``drop``."""
    nodes = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        entry = nodes.setdefault(name[: -len("_kernel_time")],
                                 {"op": args.get("op_name", ""), "provider": args.get("provider", ""), "us": []})
        entry["us"].append(event.get("dur", 0))
    return {name: {"op": e["op"], "provider": e["provider"], "ms": float(np.median(e["us"][drop:] or e["us"])) / 1000.0}
            for name, e in nodes.items()}


def run(models, feeds, providers=ALL, provider_options=None, threads=1, batch_size=8, warmup=3,
        repeats=20, profile_runs=0):
    """Run every model of ``models`` (label -> bytes or path) on each provider, side by side.

    providers : ONNX Runtime provider names, or ``"all"`` for every provider of this build.
    provider_options : provider name -> its options (e.g. ``{"OpenVINOExecutionProvider":
        {"device_type": "CPU"}}``).
    Outputs cover all of ``feeds`` (arrays with a common axis 0, run ``batch_size`` rows at a time);
    latency and the profile (``profile_runs`` > 0) use the first batch. Under emulation (:func:`emulation`)
    nothing is timed or profiled: an emulated CPU's times say nothing of the device's (QEMU emulates
    float lanes in software: int8 looked 5x faster than fp32 where the real CPU ran it 4x slower).
    Returns a JSON-able dict with arrays left as numpy arrays (:func:`encode` turns them into text).
    """
    available = ort.get_available_providers()
    emulated = emulation()
    if providers == ALL:
        providers = list(available)
    first = next(batches(feeds, batch_size))
    results = []
    for provider in providers:
        result = {"provider": provider, "available": provider in available, "reason": "", "failed": "",
                  "models": {},
                  # what the session gets: the user's options over onnxlr's defaults
                  "options": session_options(provider, (provider_options or {}).get(provider), threads)}
        results.append(result)
        if not result["available"]:
            result["reason"] = "not in this onnxruntime build"
            continue
        if provider in NOT_DEVICES:
            result["reason"] = NOT_DEVICES[provider]
            continue
        sessions = {}
        for label, model in models.items():
            try:
                sessions[label] = session(model, provider, result["options"], threads)
                if provider not in sessions[label].get_providers():
                    # ONNX Runtime drops a provider it cannot create (bad option, missing device) and
                    # silently runs everything on the CPU: that is not a run on this provider.
                    raise RuntimeError(f"ONNX Runtime could not create {provider} with options "
                                       f"{result['options']} and fell back to CPU")
                result["models"][label] = {"outputs": _run_all(sessions[label], feeds, batch_size),
                                           "kinds": output_kinds(sessions[label])}
            except Exception as exc:  # ONNX Runtime raises its own exception types
                result["failed"], result["reason"] = label, " ".join(str(exc).split())[:300]
                break
        if result["failed"]:
            continue
        if emulated or not repeats:
            continue
        for label, latency in measure_latency(sessions, first, warmup, repeats).items():
            result["models"][label]["latency"] = latency
        if profile_runs:
            profiles = profile_nodes(models, provider, result["options"], threads, first, profile_runs, warmup)
            for label, nodes in profiles.items():
                result["models"][label]["nodes"] = nodes
    return {"onnxruntime": ort.__version__, "python": platform.python_version(),
            "machine": platform.platform(), "emulated": emulated, "available": available, "results": results}


def encode(response):
    """``response`` with every output dict replaced by base64 ``.npz`` text (JSON-able)."""
    out = json.loads(json.dumps(response, default=lambda _: None))
    for result, original in zip(out["results"], response["results"]):
        for label, entry in original["models"].items():
            if "outputs" in entry:
                out_entry = result["models"][label]
                out_entry["outputs"] = _npz_text(entry["outputs"])
                out_entry["output_order"] = list(entry["outputs"])
    return out


def decode(response):
    """Inverse of :func:`encode`: outputs back to name -> array, in the model's output order."""
    for result in response["results"]:
        for entry in result["models"].values():
            if isinstance(entry.get("outputs"), str):
                arrays = _npz_arrays(entry["outputs"])
                entry["outputs"] = {name: arrays[name] for name in entry.pop("output_order", list(arrays))}
    return response


def _npz_text(arrays):
    buffer = io.BytesIO()
    # np.savez keys must be valid names for its zip entries; index them and keep the names aside
    np.savez(buffer, **{f"a{i}": a for i, a in enumerate(arrays.values())})
    names = json.dumps(list(arrays))
    return base64.b64encode(names.encode()).decode() + "." + base64.b64encode(buffer.getvalue()).decode()


def _npz_arrays(text):
    names_b64, data_b64 = text.split(".", 1)
    names = json.loads(base64.b64decode(names_b64))
    with np.load(io.BytesIO(base64.b64decode(data_b64)), allow_pickle=False) as data:
        return {name: data[f"a{i}"] for i, name in enumerate(names)}


def encode_request(models, feeds, **kwargs):
    """One line of text carrying a :func:`run` call: models as bytes, feeds, and keyword arguments."""
    request = {"models": {label: base64.b64encode(data).decode() for label, data in models.items()},
               "feeds": _npz_text(feeds), "kwargs": kwargs}
    return json.dumps(request)


def serve(stdin, stdout):
    """Read one request line from ``stdin``, run it, write one tagged response line to ``stdout``."""
    request = json.loads(stdin.readline())
    models = {label: base64.b64decode(data) for label, data in request["models"].items()}
    try:
        response = encode(run(models, _npz_arrays(request["feeds"]), **request["kwargs"]))
    except Exception as exc:  # reported to onnxlr as one line, not a remote traceback
        response = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    stdout.write(RESPONSE_TAG + json.dumps(response) + "\n")
    stdout.flush()


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=".onnx files")
    parser.add_argument("--inputs", required=True, help=".npz of inputs keyed by input name")
    parser.add_argument("--providers", default=ALL, help="comma-separated provider names, or all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile-runs", type=int, default=0)
    parser.add_argument("--out", help="write the JSON here instead of printing it")
    args = parser.parse_args(argv)
    with np.load(args.inputs, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    providers = ALL if args.providers == ALL else args.providers.split(",")
    response = encode(run({os.path.basename(m): m for m in args.models}, feeds, providers, threads=args.threads,
                          batch_size=args.batch_size, repeats=args.repeats, profile_runs=args.profile_runs))
    text = json.dumps(response, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
