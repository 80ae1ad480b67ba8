"""The installed version of onnxlr, read from the package metadata so pyproject.toml stays the one place
it is written."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnxlr")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
