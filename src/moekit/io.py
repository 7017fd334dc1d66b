"""Atomic file writing in open formats (JSON, safetensors): a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.errors import MoekitError


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    write_atomic(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_tensors_atomic(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def read_json(path: Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MoekitError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoekitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_tensors(path: Path, what: str = "tensor file") -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MoekitError(f"{path}: {what} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise MoekitError(f"{path}: not a readable safetensors file ({exc})") from None


def check_tensor_names(source: str, expected: Iterable[str], found: Iterable[str]) -> None:
    """Refuse tensors (read from `source`) whose names are not the ones a model expects, in one
    line naming the first few missing and unexpected ones."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        detail = [f"missing {', '.join(missing[:5])}"] if missing else []
        detail += [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []
        raise MoekitError(f"{source}: does not match the model ({'; '.join(detail)})")
