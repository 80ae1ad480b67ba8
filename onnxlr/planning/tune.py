"""``onnxlr tune``: the fastest model within a tolerance, for each provider and device.

The search runs in stages, cheap before expensive, and records every result on disk as soon as it has
it (:class:`TuneCache`), so an interrupted or repeated run measures nothing twice:

1. **build** each candidate (a recipe and its settings, :data:`CANDIDATES`), in order of expected
   speed. Within a family of budgets (low rank at params 0.5 / 0.75 / 0.9) the strongest comes first
   and the milder ones are not built once a stronger one met the tolerance on the check below;
2. **check** each build's outputs on the held-out inputs on this machine's CPU against the tolerance
   (``--max-error``, and the task metric when an evaluator is given): a candidate that fails is dropped,
   with the measured value as the reason;
3. **time** the survivors and the original together on every provider of every device, interleaved in
   one loop, and check their outputs there again (a provider's kernels can break what the CPU kept).
   An emulated device (:mod:`onnxlr.runtimes.runner`'s ``emulation``) only checks outputs, on the first
   :data:`EMULATED_SAMPLES` samples: its times are not the device's, and a candidate that breaks on its
   kernels is not picked for any target;
4. **pick** per target the fastest candidate that holds the tolerance there; candidates within the
   run's noise of the fastest count as tied, and the smallest file wins the tie.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np

from onnxlr import io, progress
from onnxlr.compare import compare
from onnxlr.errors import OnnxlrError
from onnxlr.feeds import fixed_batch
from onnxlr.planning import optimizer
from onnxlr.planning.options import optimize_options
from onnxlr.runtimes.devices import Device
from onnxlr.runtimes.latency import Latency, speedup_noise
from onnxlr.planning.tune_parts import (  # noqa: F401 - CANDIDATES and TuneOptions are tune's public names
    CANDIDATES, Candidate, TuneCache, TuneOptions, Verdict, held_out, judge, run_outputs)
from onnxlr.runtimes.providers import default_threads, parse_provider_specs
from onnxlr.runtimes.runner import ALL, NOT_DEVICES

EMULATED_SAMPLES = 16
# an emulated device's outputs of a model must agree with this machine's this well (worst-sample cosine
# for floats, share of equal elements for integers): ARM's fp32 and static int8 kernels agree to 1e-6
EMULATED_AGREEMENT = 0.999
MANIFEST_VERSION = 1


def tune(options: TuneOptions) -> dict:
    """Run the search; returns the manifest (docs/tune.schema.json), with the picks written to
    ``options.output``."""
    return _Search(options).run()


class _Search:
    def __init__(self, options: TuneOptions):
        self.options = options
        self.started = time.perf_counter()
        self.model, _ = io.open_model(options.model)
        self.feeds, self.extras = held_out(self.model, options.inputs)
        self.data = {**self.feeds, **self.extras}
        self.threads = options.threads or default_threads()
        # a model exported with a fixed batch runs that many samples at a time
        self.batch_size = fixed_batch(self.model) or options.batch_size
        io.check_output_path(options.output / "tune.json", options.model)
        context = {"model": hashlib.sha256(self.model.SerializeToString()).hexdigest(),
                   "inputs": hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in self.data.values())
                                            ).hexdigest(),
                   "calib": str(options.calib), "tolerance": str(options.tolerance), "max_drop": options.max_drop,
                   "evaluator": getattr(options.evaluator, "__name__", None)}
        self.cache = TuneCache(options.output / ".tune-cache", context)
        self.candidates = [c for c in CANDIDATES if options.candidates is None or c.name in options.candidates]
        self.rows: dict[str, dict] = {c.name: {"name": c.name, "settings": c.settings, "status": "pending",
                                               "reason": "", "bytes": None, "build_seconds": None, "targets": {}}
                                      for c in self.candidates}

    def run(self) -> dict:
        local = self._reference_run()
        passed = self._build_and_check(local)
        targets = self._time(passed)
        return self._manifest(targets)

    # ----------------------------------------------------------------------------------- stages 1, 2

    def _reference_run(self) -> dict:
        """The original's outputs on this machine's CPU (and its task score)."""
        response = run_outputs(Device("local"), {"original": self.model.SerializeToString()}, self.feeds,
                               "CPUExecutionProvider", self.threads, self.batch_size, repeats=0)
        if response["failed"]:
            raise OnnxlrError(f"the original model does not run on the held-out data: {response['reason']}")
        outputs = response["models"]["original"]["outputs"]
        score = self.options.evaluator(outputs, self.data) if self.options.evaluator else None
        return {"outputs": outputs, "score": score}

    def _build_and_check(self, local: dict) -> list[Candidate]:
        passed, settled = [], set()
        for index, candidate in enumerate(self.candidates):
            row = self.rows[candidate.name]
            if candidate.family and candidate.family in settled:
                row.update(status="not built", reason="a stronger budget of its family already met the tolerance")
                continue
            progress.phase(f"tune: candidate {index + 1}/{len(self.candidates)} {candidate.name}")
            built = self._build(candidate)
            row.update(bytes=built.get("bytes"), build_seconds=built.get("seconds"))
            if "error" in built:
                unchanged = built["error"] == "rewrites nothing in this model"
                row.update(status="no change" if unchanged else "failed", reason=built["error"])
                continue
            check = self.cache.get(f"check/{candidate.key}")
            if check is None:
                response = run_outputs(Device("local"), {"candidate": self.cache.model_path(candidate).read_bytes()},
                                       self.feeds, "CPUExecutionProvider", self.threads, self.batch_size, 0)
                if response["failed"]:
                    check = {"holds": False, "reason": f"does not run: {response['reason']}"}
                else:
                    verdict = judge(self.options, local["outputs"], response["models"]["candidate"]["outputs"],
                                    self.data, local["score"])
                    check = dataclasses.asdict(verdict)
                self.cache.put(f"check/{candidate.key}", check)
            row["check"] = check
            if not check["holds"]:
                row.update(status="dropped", reason=f"on the held-out inputs (local CPU): {check['reason']}")
                continue
            row["status"] = "passed check"
            passed.append(candidate)
            settled.add(candidate.family) if candidate.family else None
        return passed

    def _build(self, candidate: Candidate) -> dict:
        key = f"build/{candidate.key}"
        built = self.cache.get(key)
        if built is not None and ("error" in built or self.cache.model_path(candidate).exists()):
            return built
        start = time.perf_counter()
        try:
            options = optimize_options(calib=str(self.options.calib), validate=False, threads=self.options.threads,
                                       **candidate.settings)
            model, report = optimizer.optimize(self.model, options)
            if not any(r.rewritten for r in report.passes if r.name != "name_nodes"):
                built = {"error": "rewrites nothing in this model", "seconds": round(time.perf_counter() - start, 2)}
            else:
                io.write_atomic(self.cache.model_path(candidate), model.SerializeToString())
                built = {"bytes": self.cache.model_path(candidate).stat().st_size,
                         "seconds": round(time.perf_counter() - start, 2)}
        except OnnxlrError as exc:
            built = {"error": str(exc), "seconds": round(time.perf_counter() - start, 2)}
        self.cache.put(key, built)
        return built

    # ------------------------------------------------------------------------------------- stage 3

    def _time(self, passed: list[Candidate]) -> list[dict]:
        """Per target (device, provider): the runs of the original and every survivor, interleaved."""
        specs = parse_provider_specs(self.options.providers)
        targets = []
        models = {"original": self.model.SerializeToString(),
                  **{c.name: self.cache.model_path(c).read_bytes() for c in passed}}
        for device in [Device("local"), *(Device.parse(d) for d in self.options.devices)]:
            for provider in self._providers_on(device, specs):
                label = f"{device.label}/{provider}"
                key = f"time/{label}/{'+'.join(sorted(c.key for c in passed))}"
                timed = self.cache.get(key)
                if timed is None:
                    progress.phase(f"tune: running {len(passed)} candidates and the original on {provider} ({device.label})")
                    timed = self._time_target(device, provider, models)
                    self.cache.put(key, timed)
                if timed.get("absent"):
                    continue
                targets.append({"device": device.label, "provider": provider, **timed})
        missing = {s.name for s in specs if s.name != ALL} - {t["provider"] for t in targets}
        if missing:
            raise OnnxlrError(f"provider {sorted(missing)[0]} is in none of the devices' onnxruntime builds "
                              "(`onnxlr providers` lists this one's)")
        return targets

    def _providers_on(self, device: Device, specs) -> list[str]:
        """The providers asked for, ``all`` standing for every provider of ``device``'s build."""
        names = [s.name for s in specs if s.name != ALL]
        if len(names) == len(specs):
            return names
        response = device.run({}, self._first_sample(), providers=[], threads=self.threads, batch_size=1, repeats=0)
        return names + [p for p in response["available"] if p not in names and p not in NOT_DEVICES]

    def _first_sample(self) -> dict:
        feeds = self.feeds
        return {k: v[:1] for k, v in feeds.items()} if all(np.ndim(v) for v in feeds.values()) else feeds

    def _time_target(self, device: Device, provider: str, models: dict[str, bytes]) -> dict:
        feeds = self.feeds
        probe = run_outputs(device, {"original": models["original"]}, self._first_sample(), provider, self.threads,
                            1, 0)
        if probe is None:
            return {"absent": True}
        if probe["failed"]:
            return {"emulated": probe["emulated"], "samples": 0, "candidates": {},
                    "unusable": f"the original model does not run here: {probe['reason'][:200]}"}
        if probe["emulated"]:
            return self._check_emulated(device, provider, models, probe["emulated"])
        ran = run_outputs(device, models, feeds, provider, self.threads, self.batch_size, self.options.repeats)
        reference = ran["models"]["original"]["outputs"]
        score = self.options.evaluator(reference, self.data) if self.options.evaluator else None
        out = {"emulated": "", "samples": _rows(feeds), "candidates": {},
               "original_latency": ran["models"]["original"].get("latency")}
        for name in models:
            entry = ran["models"].get(name)
            if name == "original":
                continue
            if entry is None or ran["failed"] == name:
                out["candidates"][name] = {"holds": False, "reason": f"fails on {provider}: {ran['reason']}"}
                continue
            verdict = judge(self.options, reference, entry["outputs"], self.data, score)
            out["candidates"][name] = {**dataclasses.asdict(verdict), "latency": entry.get("latency")}
        return out

    def _check_emulated(self, device: Device, provider: str, models: dict[str, bytes], emulated: str) -> dict:
        """Each model's outputs on the emulated device against the same model's on this machine's CPU, on
        the first samples: a candidate whose outputs move on those kernels (more than the original's do)
        breaks there. Its tolerance was judged on every held-out sample already; a few samples cannot
        judge it again (one flipped label of 16 is a 6% disagreement)."""
        feeds = {k: (v[:EMULATED_SAMPLES] if np.ndim(v) else v) for k, v in self.feeds.items()}
        there = run_outputs(device, models, feeds, provider, self.threads, self.batch_size, 0)
        here = run_outputs(Device("local"), models, feeds, "CPUExecutionProvider", self.threads,
                           self.batch_size, 0)
        out = {"emulated": emulated, "samples": _rows(feeds), "candidates": {}}
        for name in models:
            if name == "original":
                continue
            if name not in there["models"] or there["failed"] == name:
                out["candidates"][name] = {"holds": False, "reason": f"fails on {provider}: {there['reason']}"}
                continue
            worst = {output: _consistency(here["models"][name]["outputs"][output], value)
                     for output, value in there["models"][name]["outputs"].items()}
            bad = {k: v for k, v in worst.items() if v < EMULATED_AGREEMENT}
            out["candidates"][name] = {
                "holds": not bad, "measured": worst, "score": None,
                "reason": "" if not bad else "outputs differ from this machine's CPU: " + ", ".join(
                    f"{k} {v:.4g} < {EMULATED_AGREEMENT}" for k, v in bad.items())}
        return out

    # ------------------------------------------------------------------------------------- stage 4

    def _manifest(self, targets: list[dict]) -> dict:
        broken = {name for t in targets if t["emulated"] for name, c in t["candidates"].items() if not c["holds"]}
        picks, written = [], {}
        for target in targets:
            for name, result in target["candidates"].items():
                self.rows[name]["targets"][f"{target['device']}/{target['provider']}"] = {
                    k: result.get(k) for k in ("holds", "reason", "measured", "score")} | {
                    "median_ms": (result.get("latency") or {}).get("median_ms")}
            if target.get("unusable"):
                picks.append({"device": target["device"], "provider": target["provider"], "pick": None,
                              "reason": target["unusable"], "original_median_ms": None})
                continue
            if target["emulated"]:
                continue
            pick = self._pick(target, broken)
            if pick is not None:
                name = pick["candidate"]
                if name not in written:
                    candidate = next(c for c in self.candidates if c.name == name)
                    written[name] = self.options.output / f"{_slug(name)}.onnx"
                    io.write_atomic(written[name], self.cache.model_path(candidate).read_bytes())
                pick["file"] = written[name].name
                self.rows[name]["status"] = "picked"
            picks.append({"device": target["device"], "provider": target["provider"], "pick": pick,
                          "reason": "" if pick else target.get("slower") or
                          "no candidate meets the tolerance here: deploy the original",
                          "original_median_ms": (target.get("original_latency") or {}).get("median_ms")})
        for row in self.rows.values():
            if row["status"] == "passed check":
                row.update(status="not picked", reason=_not_picked(row, picks))
        emulated = [{"device": t["device"], "provider": t["provider"], "emulated": t["emulated"],
                     "samples": t["samples"]} for t in targets if t["emulated"]]
        return {"manifest_version": MANIFEST_VERSION, "model": str(self.options.model),
                "model_bytes": len(self.model.SerializeToString()),
                "settings": self.options.settings(), "targets": picks, "emulated_checks": emulated,
                "candidates": list(self.rows.values()), "measurements_made": self.cache.computed,
                "seconds": round(time.perf_counter() - self.started, 1)}

    def _pick(self, target: dict, broken: set[str]) -> dict | None:
        """The fastest candidate holding the tolerance on ``target`` (and on every emulated device);
        within the run's noise of the fastest, the smallest file."""
        original = Latency(**target["original_latency"])
        holding = [(name, Latency(**c["latency"])) for name, c in target["candidates"].items()
                   if c["holds"] and name not in broken and c.get("latency")]
        if not holding:
            return None
        fastest = min(holding, key=lambda item: item[1].median_ms)
        tied = [(name, lat) for name, lat in holding
                if lat.median_ms / fastest[1].median_ms - 1 <= (speedup_noise(lat, fastest[1]) or 0.0)]
        name, latency = min(tied, key=lambda item: self.rows[item[0]]["bytes"] or 0)
        noise = speedup_noise(original, latency)
        if latency.median_ms / original.median_ms - 1 > (noise or 0.0):
            target["slower"] = (f"no candidate that meets the tolerance is as fast as the original (the fastest, "
                                f"{fastest[0]}: {fastest[1].median_ms:.3g} ms against {original.median_ms:.3g} ms)")
            return None
        return {"candidate": name, "settings": self.rows[name]["settings"], "bytes": self.rows[name]["bytes"],
                "median_ms": latency.median_ms, "original_median_ms": original.median_ms,
                "speedup": original.median_ms / latency.median_ms, "speedup_noise": noise,
                "tied_with": [n for n, _ in tied if n != name],
                "measured": target["candidates"][name]["measured"], "score": target["candidates"][name]["score"]}


def _rows(feeds: dict) -> int:
    return max((int(v.shape[0]) for v in feeds.values() if np.ndim(v)), default=1)


def _consistency(here: np.ndarray, there: np.ndarray) -> float:
    """Worst-sample cosine of two runs of one float output, or the share of equal elements of an
    integer one."""
    comparison = compare("output", here, there)
    return comparison.agreement if comparison.exact else comparison.cosine_min


def _not_picked(row: dict, picks: list[dict]) -> str:
    slower = [f"{p['provider']} ({p['device']}): {p['pick']['candidate']}" for p in picks if p["pick"]]
    failed = [f"{where}: {t['reason']}" for where, t in row["targets"].items() if not t["holds"]]
    return "; ".join(failed) if failed else ("slower than " + ", ".join(slower) if slower else "")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-." else "_" for ch in name)
