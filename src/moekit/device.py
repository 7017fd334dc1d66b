"""Where a run computes and in which precision: `device: auto|cpu|cuda`, `dtype: fp32|bf16`.

bf16 is mixed precision, not a cast of the model: the weights and the optimizer state stay fp32,
the matrix products run in bf16 under `torch.autocast`, and the router's arithmetic and the
balancing statistics stay fp32 (`routing.token_choice.router_logits`, `MoE.forward_with_routing`).
bf16 needs no loss scaling (its exponent range is fp32's). On a CPU without native bf16
arithmetic (AVX512_BF16 or AMX) bf16 products are emulated and run many times slower than fp32,
which the run says once, up front.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from pathlib import Path

import torch

from moekit.errors import ConfigError, require_choice

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name: str, field: str = "train.device", local_rank: int = 0) -> torch.device:
    """`auto`: this process's GPU (its torchrun local rank) when there is one, else the CPU;
    `cuda` without a GPU is an error naming the field."""
    require_choice(field, name, DEVICES)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cuda":
        raise ConfigError(field, "got 'cuda', but torch sees no CUDA device (use 'auto' or 'cpu')")
    return torch.device("cpu")


def resolve_dtype(name: str, field: str = "train.dtype") -> torch.dtype:
    require_choice(field, name, DTYPES)
    return TORCH_DTYPES[name]


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where it does not)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512_BF16 or AMX): else they are
    emulated, ~100x slower than fp32."""
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def bf16_speed_note(device: torch.device) -> str | None:
    """One line for the user when bf16 on this device will be slow, else None."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        return (
            "bf16 on this CPU is emulated (no AVX512_BF16 or AMX): expect it to run much slower "
            "than fp32; use dtype fp32 here"
        )
    return None


def warn_if_slow_bf16(dtype: torch.dtype, device: torch.device) -> None:
    note = bf16_speed_note(device) if dtype == torch.bfloat16 else None
    if note:
        warnings.warn(note, stacklevel=2)


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """The mixed-precision context of a forward pass: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would compute `tensor`'s products in, or None when autocast is off on
    its device (or the tensor is float64, which autocast leaves alone)."""
    kind = tensor.device.type
    if tensor.dtype == torch.float64 or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def no_autocast(tensor: torch.Tensor) -> AbstractContextManager:
    """Autocast off on `tensor`'s device: for arithmetic that must stay in its own dtype (routers).
    Nothing to enter where autocast is off already (a decode step saves the context's cost)."""
    if not torch.is_autocast_enabled(tensor.device.type):
        return nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def add_device_arguments(parser) -> None:
    """`--device` and `--dtype` for the commands that run a model (eval, analyze)."""
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="where to run (auto: a GPU if present)"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=DTYPES, help="fp32, or bf16 (autocast; the router stays fp32)"
    )


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with the same values (the tensor itself when it is on the CPU already):
    checkpoints are written from these, so they load on any device."""
    return tensor.detach().cpu() if tensor.device.type != "cpu" else tensor
