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


def _lexists(path: Path) -> bool:
    """Whether anything (a broken symbolic link too) is at `path`; an unreadable place is an error."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise MoekitError(f"{path}: cannot look there ({exc.strerror or exc})") from None
    return True


def _nearest_existing(path: Path) -> Path:
    """The nearest of `path` and its ancestors that exists (`..` taken lexically, as mkdir -p does)."""
    existing = Path(os.path.abspath(path))
    while not _lexists(existing):
        existing = existing.parent
    return existing


def _probe(directory: Path, new_directory: bool) -> None:
    """Create and remove a scratch entry in the existing `directory`: a directory when the command
    will have to make one there, else a file. Raises OSError when that is refused."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(13, "permission denied")
    if new_directory:
        os.rmdir(tempfile.mkdtemp(prefix=".moekit-write-check.", dir=directory))
    else:
        fd, probe = tempfile.mkstemp(prefix=".moekit-write-check.", dir=directory)
        os.close(fd)
        os.unlink(probe)


def _check_location(path: Path, what: str, shown: Path) -> None:
    """A directory `path` exists or can be made, and this process can write in it; creates
    nothing (its nearest existing ancestor is probed). Errors name `what` and `shown`."""
    existing = _nearest_existing(path)
    if not existing.is_dir():  # follows a symbolic link to a directory
        if existing.is_file():
            kind = "a file, not a directory"
        elif existing.is_symlink() and not existing.exists():
            kind = "a broken symbolic link"
        else:
            kind = "not a directory"
        raise MoekitError(f"{what} {shown}: {existing} is {kind}")
    try:
        _probe(existing, new_directory=Path(os.path.abspath(path)) != existing)
    except OSError as exc:
        raise MoekitError(f"{what} {shown}: {existing} is not writable ({exc.strerror or exc})") from None


def require_writable_dir(path: Path, what: str) -> None:
    """`path` is (or can be made) a directory this process can write a file into. Nothing is created:
    the command makes the directory itself when it starts writing, so a run refused later leaves
    nothing behind."""
    path = Path(path)
    if _lexists(path) and not path.is_dir():
        raise MoekitError(f"{what} {path}: exists and is not a directory")
    _check_location(path, what, path)


def require_writable_file(path: Path, what: str) -> None:
    """A file can be written at `path` (its directory is writable; the file itself is not a directory)."""
    path = Path(path)
    if _lexists(path):
        if path.is_dir():
            raise MoekitError(f"{what} {path}: is a directory, expected a file path")
        if path.exists() and not path.is_file():
            raise MoekitError(f"{what} {path}: exists and is not a regular file")
    _check_location(path.parent, what, path)


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
    elif command == "data":
        if getattr(args, "data_command", None) == "build":
            _check_corpus_locations(args)
    elif command in ("upcycle", "compress", "merge"):
        require_writable_dir(Path(args.out), "--out")
    elif command in ("branch", "mix"):
        require_writable_dir(Path(args.out), "OUT")
    elif command in ("generate", "eval-tasks") and args.json is not None:
        require_writable_file(Path(args.json), "--json")


def _check_corpus_locations(args: argparse.Namespace) -> None:
    """`moekit data build`: the corpus folder (--out, else <cache>/<source>) and the cache."""
    if args.cache_dir is not None:
        require_writable_dir(Path(args.cache_dir), "--cache-dir")
    if args.out is not None:
        require_writable_dir(Path(args.out), "--out")
    else:
        from moekit.data.build import default_cache_dir

        cache, what = (
            (args.cache_dir, "--cache-dir")
            if args.cache_dir is not None
            else (default_cache_dir(), "the data cache ($MOEKIT_DATA_CACHE or --cache-dir)")
        )
        require_writable_dir(Path(cache) / args.source, what)
