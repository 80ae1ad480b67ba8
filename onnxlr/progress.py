"""What a run is doing, while it does it: one line per phase on stderr (``[onnxlr] calibration: …``), and
progress bars for long loops on a terminal.

The command line turns it on (``-q`` turns it off again); the Python API stays silent unless
:func:`configure` is called. Lines go to stderr, so the report on stdout stays clean.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PREFIX = "[onnxlr] "
_state = {"on": False, "started": None}


def configure(on: bool) -> None:
    """Show phases and bars (the CLI, unless ``-q``) or not (the default for the Python API)."""
    _state["on"], _state["started"] = on, time.perf_counter()


def phase(message: str) -> None:
    """One line saying what starts now, with the seconds since the run began."""
    if _state["on"]:
        elapsed = time.perf_counter() - (_state["started"] or time.perf_counter())
        print(f"{PREFIX}{elapsed:6.1f} s  {message}", file=sys.stderr, flush=True)


def bar(iterable, **options):
    """``tqdm(iterable)`` on a terminal when progress is on; the iterable itself otherwise."""
    return tqdm(iterable, disable=None if _state["on"] else True, leave=False, **options)
