"""Checks every command makes before any long work: its inputs exist, its optional dependencies are
installed, its output directory can be written. A run that would fail after twenty minutes of
training (no matplotlib for the report, an output path under a file) fails in the first second
instead, with one line naming what is wrong."""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

from moekit.errors import MoekitError

# Optional dependency -> the extra that installs it.
EXTRAS = {"matplotlib": "report", "transformers": "hf", "deepspeed": "bench"}


def require_module(module: str, purpose: str) -> None:
    """The optional `module` is importable, else an error naming the extra to install."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS.get(module, "all")
        raise MoekitError(f"{purpose} needs {module}: pip install 'moekit[{extra}]'")


def require_input(path: Path, what: str) -> None:
    if not Path(path).exists():
        raise MoekitError(f"{path}: {what} not found")


def require_writable_dir(path: Path, what: str) -> None:
    """`path` is (or can be made) a directory this process can write a file into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoekitError(f"{what} {path}: exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MoekitError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moekit-write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MoekitError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None


def require_writable_file(path: Path, what: str) -> None:
    """A file can be written at `path` (its directory is writable; the file itself is not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise MoekitError(f"{what} {path}: is a directory, expected a file path")
    require_writable_dir(path.parent if str(path.parent) else Path("."), what)


def check_command(args: argparse.Namespace) -> None:
    """The checks for the command `args` runs (the CLI calls this before the command's handler)."""
    command = getattr(args, "command", None)
    if command == "train":
        require_input(args.config, "config file")
        if getattr(args, "resume", None) not in (None, "latest"):
            require_input(Path(args.resume), "--resume checkpoint")
    elif command == "eval":
        require_input(args.checkpoint, "checkpoint")
    elif command == "demo":
        require_module("matplotlib", "the demo's HTML report")
        require_writable_dir(args.out, "--out")
    elif command == "analyze":
        require_module("matplotlib", "the routing report")
        require_input(args.checkpoint, "checkpoint")
        require_writable_dir(args.out, "--out")
    elif command == "convert":
        require_module("transformers", "converting Hugging Face checkpoints")
        require_input(args.src, "source checkpoint")
        require_writable_dir(Path(args.dst).parent, "DST's parent")
    elif command == "bench":
        if getattr(args, "bench_command", None) == "hf":
            require_module("transformers", "the HF benchmark")
        if getattr(args, "json", None):
            require_writable_file(Path(args.json), "--json")
