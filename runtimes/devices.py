"""Where models run: this process, or another Python reached through a command prefix.

``--device PREFIX`` names a command that starts a Python with onnxruntime and numpy:

- ``/opt/ov/bin/python`` — a virtual environment holding another onnxruntime build (onnxruntime-openvino
  replaces the ``onnxruntime`` module, so it cannot live in onnxlr's environment);
- ``ssh user@board`` or ``ssh user@board /usr/bin/python3`` — a board;
- ``adb shell`` or ``adb shell /data/local/tmp/python3`` — a phone with a Python (e.g. Termux).

When the prefix does not name a Python, ``python3`` is appended. onnxlr ships the standalone runner
(:mod:`onnxlr.runtimes.runner`) and the request over stdin, so nothing has to be installed on the
device but onnxruntime and numpy. ssh and adb hand their arguments to a remote shell, so the code
passed with ``-c`` is shell-quoted for them.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes import runner

LOCAL = "local"
REMOTE_SHELLS = ("ssh", "adb")
DEVICE_TIMEOUT_S = 3600
# Reads the runner's source from the first stdin line (base64) and serves one request.
BOOTSTRAP = ("import sys,base64;g={'__name__':'onnxlr_runner'};"
             "exec(compile(base64.b64decode(sys.stdin.readline()),'onnxlr_runner.py','exec'),g);"
             "g['serve'](sys.stdin,sys.stdout)")


@dataclass(frozen=True)
class Device:
    """``label``: what the user wrote (``local`` for this process); ``command``: the prefix's words."""

    label: str
    command: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Device":
        spec = spec.strip()
        if not spec or spec == LOCAL:
            return cls(LOCAL)
        try:
            words = shlex.split(spec)
        except ValueError as exc:
            raise OnnxlrError(f"malformed --device {spec!r}: {exc}") from None
        if not any("python" in Path(w).name for w in words):
            words.append("python3")
        return cls(spec, tuple(words))

    @property
    def is_local(self) -> bool:
        return not self.command

    def argv(self) -> list[str]:
        """The command run: the prefix, then ``-c BOOTSTRAP`` (quoted for a remote shell)."""
        remote = Path(self.command[0]).name in REMOTE_SHELLS
        return [*self.command, "-c", shlex.quote(BOOTSTRAP) if remote else BOOTSTRAP]

    def run(self, models: dict[str, bytes], feeds: dict[str, np.ndarray], **kwargs) -> dict:
        """:func:`runner.run` here or on the device; outputs come back as arrays either way."""
        if self.is_local:
            return runner.run(models, feeds, **kwargs)
        source = Path(runner.__file__).read_bytes()
        stdin = (base64.b64encode(source).decode() + "\n"
                 + runner.encode_request(models, feeds, **kwargs) + "\n")
        try:
            done = subprocess.run(self.argv(), input=stdin, capture_output=True, text=True,
                                  timeout=DEVICE_TIMEOUT_S)
        except FileNotFoundError:
            raise OnnxlrError(f"device {self.label!r}: command {self.command[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise OnnxlrError(f"device {self.label!r} gave no answer within {DEVICE_TIMEOUT_S} s") from None
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith(runner.RESPONSE_TAG)), None)
        if line is None:
            said = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["nothing"])[-1]
            raise OnnxlrError(f"device {self.label!r} did not run the models (exit {done.returncode}): {said[:300]}")
        response = json.loads(line[len(runner.RESPONSE_TAG):])
        if "error" in response:
            raise OnnxlrError(f"device {self.label!r}: {response['error']}")
        return runner.decode(response)


def parse_devices(specs: str | list[str] | tuple[str, ...] | None) -> list[Device]:
    """The local process first, then each ``--device`` prefix (repeats dropped)."""
    items = [specs] if isinstance(specs, str) else list(specs or [])
    devices = [Device(LOCAL)]
    for spec in items:
        device = Device.parse(spec)
        if device not in devices:
            devices.append(device)
    return devices
