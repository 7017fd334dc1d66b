"""Routed experts streamed from the checkpoint on disk into a cache of a fixed byte budget.

For models larger than memory: the dense weights (attention, norms, routers, shared experts) stay
in memory, and each MoE layer's routed experts are read from the checkpoint's safetensors when a
token is routed to them, into a per-layer cache evicted by a policy:

- `lru`: the least recently used expert (a per-layer LRU, as colibri and llama.cpp's cache PRs do);
- `lfu`: the expert requested least often so far (ties: least recently);
- `pinned`: after a warm-up, the layer's most requested experts stay resident and the remaining
  slots (at least the layer's top-k) stream by LRU (KTransformers' "frequency" placement);
- `auto`: after the warm-up, the cache simulator of `moekit analyze` (`analysis/cache.py`) replays
  each layer's recorded requests and picks LRU or LFU and the split of the budget across layers
  that hits most: layers whose routing is locally consistent get more slots.

Prefetch: while a layer computes, the next MoE layer's router is applied to the current layer's
input (the residual stream changes little in one layer: colibri measures routing "71.6 %
predictable one layer ahead") and its likely experts are read by a background thread owned by the
handle. Reads are `os.pread` of the exact byte range of one expert (the safetensors header gives
the offsets), so the bytes read are counted exactly, the thread runs while the interpreter lock is
released, and resident memory is the cache, not a growing file mapping.

Numerics are untouched: a layer's needed experts are stacked in expert order and run through the
same grouped kernel as in memory, so offloaded outputs equal in-memory outputs bit for bit.

    with attach(model, OffloadConfig(budget_bytes="25%")) as handle:
        logits = model(input_ids).logits
    print(handle.report())
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.analysis.cache import lru_hit_counts, simulate_cache
from moekit.analysis.recorder import find_moe_layers
from moekit.dispatch.grouped import grouped_experts
from moekit.errors import ConfigError, MoekitError, require_choice
from moekit.experts.packed import PackedExperts
from moekit.layer import MoE
from moekit.routing.record import Routing

POLICIES = ("lru", "lfu", "pinned", "auto")
# Tokens routed before `pinned` chooses its resident experts and `auto` first re-plans; `auto`
# re-plans again each time the tokens seen double.
WARMUP_TOKENS = 32
EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def parse_budget(text: str | int) -> int | float:
    """A budget as bytes (int: "2GB", "512MiB", "1e9", 4096) or a fraction of the model's expert
    bytes (float in (0, 1]: "25%"). KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024."""
    if isinstance(text, bool):
        raise ConfigError("offload.budget_bytes", f"got {text!r}, expected bytes or a percentage")
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError("offload.budget_bytes", f"got {text}, expected a positive number of bytes")
        return text
    if not isinstance(text, str):
        raise ConfigError("offload.budget_bytes", f"got {text!r}, expected bytes or a percentage")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(%|[a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "%" and unit not in _UNITS):
        raise ConfigError(
            "offload.budget_bytes",
            f"got {text!r}, expected a size like 2GB, 512MiB, 4096 or a percentage like 25%",
        )
    value = float(match.group(1))
    if unit == "%":
        if not 0 < value <= 100:
            raise ConfigError("offload.budget_bytes", f"got {text!r}, expected a percentage in (0, 100]")
        return value / 100
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError("offload.budget_bytes", f"got {text!r}, expected a positive size")
    return size


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class OffloadConfig:
    """`budget_bytes`: bytes of routed experts held in memory ("2GB", "25%" of the expert bytes,
    or an int); `source`: the checkpoint folder the experts are read from (HF folder, moekit family
    checkpoint or run directory; default: the one the model was loaded from)."""

    budget_bytes: int | str
    policy: str = "lru"
    prefetch: bool = True
    source: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        parse_budget(self.budget_bytes)
        require_choice("offload.policy", self.policy, POLICIES)
        if not isinstance(self.prefetch, bool):
            raise ConfigError("offload.prefetch", f"got {self.prefetch!r}, expected true or false")


# ---------------------------------------------------------------- reading experts from safetensors


@dataclass(frozen=True)
class _TensorLocation:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> dict[str, _TensorLocation]:
    """Every tensor's dtype, shape and byte range, from the file's JSON header."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise MoekitError(f"{path}: not a readable safetensors file ({exc})") from None
    start = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise MoekitError(
                f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which offloading cannot read"
            )
        begin, end = info["data_offsets"]
        out[name] = _TensorLocation(path, dtype, tuple(info["shape"]), start + begin, end - begin)
    return out


class _SafetensorsReader:
    """Reads row ranges (along dim 0) of tensors spread over one or more safetensors files."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, _TensorLocation] = {}
        for file in files:
            self.tensors.update(_read_safetensors_header(file))
        self._fds = {file: os.open(file, os.O_RDONLY) for file in files}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location(name).shape

    def location(self, name: str) -> _TensorLocation:
        if name not in self.tensors:
            raise MoekitError(f"offload source: no tensor {name!r} in {', '.join(str(f) for f in self._fds)}")
        return self.tensors[name]

    def rows(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows [start, stop) of tensor `name`, read straight into `out` (a contiguous tensor of
        that shape and the file's dtype, e.g. part of an expert's buffer) or a new tensor."""
        loc = self.location(name)
        row_elements = math.prod(loc.shape[1:])
        row_bytes = row_elements * loc.dtype.itemsize
        if not 0 <= start <= stop <= loc.shape[0] or row_bytes * loc.shape[0] != loc.nbytes:
            raise MoekitError(f"{loc.file}: cannot read rows {start}:{stop} of {name} {loc.shape}")
        shape = (stop - start, *loc.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=loc.dtype)
        length = (stop - start) * row_bytes
        if length == 0:
            return out
        view, done = memoryview(out.view(torch.uint8).numpy()).cast("B"), 0
        fd = self._fds[loc.file]
        while done < length:  # pread may return fewer bytes than asked
            n = os.preadv(fd, [view[done:]], loc.offset + start * row_bytes + done)
            if n <= 0:
                raise MoekitError(f"{loc.file}: file ends inside tensor {name}")
            done += n
        with self._lock:
            self.bytes_read += length
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _interleaved_columns(t: Tensor) -> Tensor:
    """[..., 2I] gate/up interleaved -> [gate | up] (GPT-OSS; as `interop.convert` joins it)."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


Read = tuple[str, int, int]  # tensor name, first row, stop row
Assemble = Callable[[list[Tensor]], dict[str, Tensor]]


Placement = tuple[Read, str, int]  # a read, the expert tensor it fills, its first row there


@dataclass(frozen=True)
class _ExpertLayout:
    """How one expert of one layer is stored: the row ranges to read, and how they become the
    expert's moekit tensors (`w_in` [in, d], `w_out` [d, ff], optional `b_in`, `b_out`).
    `direct`, where the stored rows are the moekit tensors' rows as they are (no transpose or
    interleave), says where each read lands, so that it is read straight into the tensor."""

    reads: Callable[[int], list[Read]]
    assemble: Assemble
    direct: Callable[[int], list[Placement]] | None = None


def _native_layout(prefix: str, reader: _SafetensorsReader) -> _ExpertLayout:
    """moekit's own state dict (family checkpoints, run checkpoints): packed [E, ...] tensors."""
    names = [p for p in EXPERT_PARAMS if f"{prefix}{p}" in reader.tensors]

    def reads(e: int) -> list[Read]:
        return [(prefix + p, e, e + 1) for p in names]

    def direct(e: int) -> list[Placement]:
        return [(read, p, 0) for read, p in zip(reads(e), names, strict=True)]

    return _ExpertLayout(reads, lambda parts: {p: t[0] for p, t in zip(names, parts, strict=True)}, direct)


def _hf_layout(model: nn.Module, layer_index: int) -> _ExpertLayout:
    """A FamilyModel's HF checkpoint, in the layout it was read from (`interop.convert`'s rules,
    one expert at a time)."""
    from moekit.interop.families import FAMILIES

    fc = model.config
    spec = FAMILIES[fc.family]
    names = spec.names.moe[fc.hf_layout]
    prefix = spec.names.layer.format(i=layer_index) + names.prefix
    fmt, raw = names.experts.format, names.experts.names
    ff = fc.moe.ff_size

    def t(x: Tensor) -> Tensor:
        return x.transpose(0, 1).contiguous()

    if fmt == "fused":
        gate_up, down = (prefix + n for n in raw)
        return _ExpertLayout(
            lambda e: [(gate_up, e, e + 1), (down, e, e + 1)],
            lambda p: {"w_in": p[0][0], "w_out": p[1][0]},
            lambda e: [((gate_up, e, e + 1), "w_in", 0), ((down, e, e + 1), "w_out", 0)],
        )
    if fmt == "per_expert":

        def per_expert_reads(e: int) -> list[Read]:
            gate, up, down = (prefix + n.format(e=e) for n in raw)
            return [(gate, 0, ff), (up, 0, ff), (down, 0, fc.hidden_size)]

        def per_expert_direct(e: int) -> list[Placement]:
            gate, up, down = per_expert_reads(e)
            return [(gate, "w_in", 0), (up, "w_in", ff), (down, "w_out", 0)]

        return _ExpertLayout(
            per_expert_reads,
            lambda p: {"w_in": torch.cat([p[0], p[1]], 0), "w_out": p[2]},
            per_expert_direct,
        )
    if fmt == "transposed":
        gate_up, down = (prefix + n for n in raw)
        return _ExpertLayout(
            lambda e: [(gate_up, e, e + 1), (down, e, e + 1)],
            lambda p: {"w_in": t(p[0][0]), "w_out": t(p[1][0])},
        )
    if fmt == "gpt_oss":
        full = [prefix + n for n in raw]
        return _ExpertLayout(
            lambda e: [(n, e, e + 1) for n in full],
            lambda p: {
                "w_in": t(_interleaved_columns(p[0][0])),
                "w_out": t(p[1][0]),
                "b_in": _interleaved_columns(p[2][0]).contiguous(),
                "b_out": p[3][0],
            },
        )
    if fmt == "dbrx":
        full = [prefix + n for n in raw]
        return _ExpertLayout(
            lambda e: [(n, e * ff, (e + 1) * ff) for n in full],
            lambda p: {"w_in": torch.cat([p[0], p[1]], 0), "w_out": t(p[2])},
        )
    raise MoekitError(f"{fc.family}: offloading does not know the expert layout {fmt!r}")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MoekitError(f"{index}: expected a safetensors index with a weight_map ({exc})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise MoekitError(f"{folder}: no model.safetensors or model.safetensors.index.json to read experts from")


def _open_source(model: nn.Module, source: Path, layers: list[tuple[str, MoE]]):
    """The reader and each layer's expert layout for `source`, whatever kind of folder it is."""
    if not source.exists():
        raise MoekitError(f"offload source {source}: no such file or directory")
    if (
        source.is_dir()
        and (source / "config.json").is_file()
        and not (source / "moekit_family.json").is_file()
    ):
        from moekit.interop.model import FamilyModel

        if not isinstance(model, FamilyModel):
            raise MoekitError(
                f"offload source {source}: an HF folder, but the model is not one moekit.from_hf loads"
            )
        reader = _SafetensorsReader(_safetensors_files(source))
        index = {id(layer.ffn): i for i, layer in enumerate(model.layers) if layer.is_moe}
        return reader, [_hf_layout(model, index[id(moe)]) for _, moe in layers]
    if source.is_dir() and (source / "moekit_family.json").is_file():
        folder = source
    else:
        from moekit.train.checkpoint import resolve_checkpoint

        folder = resolve_checkpoint(source)
    reader = _SafetensorsReader(_safetensors_files(folder))
    return reader, [_native_layout(f"{name}.experts.", reader) for name, _ in layers]


# ---------------------------------------------------------------- the cache


@dataclass
class _LayerStats:
    requests: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    trace: list[int] = field(default_factory=list)  # demand requests, in order


class _LayerCache:
    """One layer's resident experts, evicted by its policy; the layer's needed experts are
    protected for the duration of a call (a prefill may briefly hold more than the slots)."""

    def __init__(self, slots: int, policy: str):
        self.slots = slots
        self.policy = policy
        self.entries: OrderedDict[int, dict[str, Tensor]] = OrderedDict()  # recency order
        self.frequency: Counter[int] = Counter()
        self.last_use: dict[int, int] = {}
        self.pinned: set[int] = set()
        self.clock = 0

    def touch(self, expert: int) -> None:
        self.clock += 1
        self.frequency[expert] += 1
        self.last_use[expert] = self.clock
        if expert in self.entries:
            self.entries.move_to_end(expert)

    def victim(self, protected: set[int]) -> int | None:
        candidates = [e for e in self.entries if e not in protected and e not in self.pinned]
        if not candidates:
            candidates = [e for e in self.entries if e not in protected]
        if not candidates:
            return None
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self.frequency[e], self.last_use.get(e, 0)))
        return candidates[0]  # least recently used (pinned experts only as a last resort)

    def trim(self, protected: set[int], room: int = 0) -> None:
        """Evict until `room` more experts fit in the slots (never evicting `protected` ones)."""
        while len(self.entries) + room > self.slots:
            victim = self.victim(protected)
            if victim is None:
                return
            del self.entries[victim]


class OffloadHandle:
    """Owns the offloaded layers, their caches, the prefetch thread and the statistics of a run.
    A context manager: leaving it (or `detach()`) puts the model's own experts back."""

    def __init__(self, model: nn.Module, config: OffloadConfig):
        self.model = model
        self.config = config
        self.layers = find_moe_layers(model)
        for name, moe in self.layers:
            if type(moe.experts) is not PackedExperts:
                raise MoekitError(
                    f"offload: layer {name} has {type(moe.experts).__name__} experts; offloading streams "
                    "packed experts (PackedExperts) only"
                )
        source = config.source if config.source is not None else getattr(model, "checkpoint_path", None)
        if source is None:
            raise MoekitError(
                "offload.source: the model does not record the checkpoint it was loaded from; "
                "pass OffloadConfig(source=<checkpoint folder>)"
            )
        self.source = Path(source)
        self.reader, self.layouts = _open_source(model, self.source, self.layers)
        self.dtypes = [
            {p: getattr(moe.experts, p).dtype for p in EXPERT_PARAMS if getattr(moe.experts, p) is not None}
            for _, moe in self.layers
        ]
        self.shapes = [
            {p: tuple(getattr(moe.experts, p).shape[1:]) for p in dtypes}
            for dtypes, (_, moe) in zip(self.dtypes, self.layers, strict=True)
        ]
        try:
            self._check_source()
        except BaseException:
            self.reader.close()
            raise
        self.expert_bytes = [
            sum(getattr(moe.experts, p)[0].nbytes for p in self.dtypes[i])
            for i, (_, moe) in enumerate(self.layers)
        ]
        self.num_experts = [moe.experts.num_experts for _, moe in self.layers]
        self.top_k = [moe.config.router.top_k for _, moe in self.layers]
        self.total_expert_bytes = sum(b * n for b, n in zip(self.expert_bytes, self.num_experts, strict=True))
        budget = parse_budget(config.budget_bytes)
        self.budget = int(budget * self.total_expert_bytes) if isinstance(budget, float) else budget
        self.policy = "lru" if config.policy == "auto" else config.policy
        self.caches = [_LayerCache(slots, self.policy) for slots in self._equal_split()]
        self.stats = [_LayerStats() for _ in self.layers]
        self.tokens = 0
        self.plans: list[dict[str, Any]] = []
        self._next_plan = WARMUP_TOKENS
        self.inflight: dict[tuple[int, int], Future] = {}
        self.inflight_bytes = 0
        self.prefetch_issued = 0
        self.prefetch_wasted = 0
        self.peak_resident = 0
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if config.prefetch else None
        )
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype], Tensor] = {}
        self._originals: list[PackedExperts] = []
        for i, (_, moe) in enumerate(self.layers):
            self._originals.append(moe.experts)
            moe.experts = OffloadedExperts(self, i, moe.experts)
        self.attached = True

    # -------------------------------------------------------- set-up

    def _check_source(self) -> None:
        """The source holds this model's experts: shapes, and the first and last expert's values
        where the model still has them in memory."""
        for i, (name, moe) in enumerate(self.layers):
            for e in (0, moe.experts.num_experts - 1):
                disk = self._read(i, e)
                for p, tensor in disk.items():
                    mine = getattr(moe.experts, p)
                    theirs = None if mine is None else tuple(mine.shape[1:])
                    if tuple(tensor.shape) != theirs:
                        raise MoekitError(
                            f"offload source {self.source}: {name} expert {e} {p} has shape "
                            f"{tuple(tensor.shape)}, the model's is {theirs}"
                        )
                    if not mine.is_meta and not torch.equal(tensor, mine[e].detach()):
                        raise MoekitError(
                            f"offload source {self.source}: {name} expert {e} {p} differs from the model's; "
                            "pass the checkpoint the model was loaded from"
                        )
        self.reader.bytes_read = 0

    def _equal_split(self) -> list[int]:
        share = self.budget // len(self.layers)
        slots = [min(n, share // b) for n, b in zip(self.num_experts, self.expert_bytes, strict=True)]
        for i, (name, _) in enumerate(self.layers):
            if slots[i] < self.top_k[i]:
                need = len(self.layers) * max(
                    k * b for k, b in zip(self.top_k, self.expert_bytes, strict=True)
                )
                raise MoekitError(
                    f"offload.budget_bytes: {self.config.budget_bytes!r} ({format_bytes(self.budget)}) holds "
                    f"{slots[i]} experts of {format_bytes(self.expert_bytes[i])} in {name}, but one token "
                    f"needs {self.top_k[i]} there; give at least {format_bytes(need)} "
                    f"({100 * need / self.total_expert_bytes:.1f}% of the experts)"
                )
        return slots

    # -------------------------------------------------------- reading

    def _read(self, layer: int, expert: int) -> dict[str, Tensor]:
        """One expert's tensors from disk, in the model's dtypes (any thread): read straight into
        them where the layout allows (one copy, from the file), else assembled and converted."""
        layout = self.layouts[layer]
        if layout.direct is not None:
            shapes = self.shapes[layer]
            out = {p: torch.empty(shapes[p], dtype=dtype) for p, dtype in self.dtypes[layer].items()}
            targets = []
            for (name, start, stop), p, row in layout.direct(expert):
                location = self.reader.location(name)
                if p not in out or location.dtype != out[p].dtype:
                    break
                target = out[p] if out[p].dim() == len(location.shape) else out[p][None]
                target = target[row : row + stop - start]
                if tuple(target.shape) != (stop - start, *location.shape[1:]):
                    break  # not the model's shape: read as stored, for `_check_source` to name it
                targets.append((name, start, stop, target))
            else:
                for name, start, stop, target in targets:
                    self.reader.rows(name, start, stop, out=target)
                return out
        parts = [self.reader.rows(*read) for read in layout.reads(expert)]
        tensors = layout.assemble(parts)
        return {p: tensors[p].to(self.dtypes[layer][p]).contiguous() for p in self.dtypes[layer]}

    def _resident_bytes(self) -> int:
        cached = sum(len(c.entries) * b for c, b in zip(self.caches, self.expert_bytes, strict=True))
        return cached + self.inflight_bytes

    def _note_peak(self) -> None:
        self.peak_resident = max(self.peak_resident, self._resident_bytes())

    def fetch(self, layer: int, experts: list[int]) -> list[dict[str, Tensor]]:
        """The tensors of `experts` (sorted ids) of `layer`, from the cache or the disk."""
        cache, stats = self.caches[layer], self.stats[layer]
        needed = set(experts)
        self._harvest(layer, needed)
        out = []
        for e in experts:
            stats.requests += 1
            stats.trace.append(e)
            cache.touch(e)
            tensors = cache.entries.get(e)
            if tensors is not None:
                stats.hits += 1
            else:
                future = self.inflight.pop((layer, e), None)
                if future is not None:
                    tensors = future.result()
                    self.inflight_bytes -= self.expert_bytes[layer]
                    stats.hits += 1
                    stats.prefetch_hits += 1
                else:
                    tensors = self._read(layer, e)
                cache.trim(needed, room=1)
                cache.entries[e] = tensors
                cache.entries.move_to_end(e)
                self._note_peak()
            out.append(tensors)
        return out

    def stack(self, name: str, parts: list[Tensor], layer: int) -> Tensor:
        """`torch.stack(parts)`, written into a buffer reused from call to call (one per expert
        tensor shape, shared by the layers) when the call needs at most the layer's top-k experts
        (decode) and no gradient is recorded: a decode step then allocates no expert memory."""
        if len(parts) > self.top_k[layer] or torch.is_grad_enabled():
            return torch.stack(parts)
        key = (name, tuple(parts[0].shape), parts[0].dtype)
        buffer = self._staging.get(key)
        if buffer is None or buffer.shape[0] < len(parts):
            with torch.inference_mode(False):  # writable in and out of inference mode
                buffer = parts[0].new_empty((max(self.top_k), *parts[0].shape))
            self._staging[key] = buffer
        return torch.stack(parts, out=buffer[: len(parts)])

    def finish_call(self, layer: int, experts: list[int]) -> None:
        """After a layer's compute: back within its slots (a prefill may have overflowed them)."""
        self.caches[layer].trim(set())

    def _harvest(self, layer: int, needed: set[int]) -> None:
        """Prefetches of `layer` nobody asked for: kept if they fit without evicting, else dropped."""
        cache = self.caches[layer]
        for key in [k for k in self.inflight if k[0] == layer and k[1] not in needed]:
            future = self.inflight[key]
            if not future.done():
                continue
            del self.inflight[key]
            self.inflight_bytes -= self.expert_bytes[layer]
            if len(cache.entries) < cache.slots and key[1] not in cache.entries:
                cache.entries[key[1]] = future.result()
                cache.entries.move_to_end(key[1], last=False)  # unproven: first to go
            else:
                self.prefetch_wasted += 1

    def prefetch(self, layer: int, x: Tensor) -> None:
        """Start reading the experts the next MoE layer's router would pick for `x`."""
        nxt = layer + 1
        if self._executor is None or nxt >= len(self.layers) or x.shape[0] == 0:
            return
        router = self.layers[nxt][1].router
        weight = getattr(router, "weight", None)
        if not isinstance(weight, Tensor) or weight.shape[-1] != x.shape[-1]:
            return
        with torch.no_grad():
            logits = F.linear(x.to(weight.dtype), weight, getattr(router, "bias", None)).float()
            bias = getattr(router, "selection_bias", None)
            if isinstance(bias, Tensor):
                logits = logits + bias
            k = min(self.top_k[nxt], logits.shape[-1])
            predicted = torch.unique(logits.topk(k, dim=-1).indices).tolist()
        cache = self.caches[nxt]
        room = cache.slots - sum(1 for key in self.inflight if key[0] == nxt)
        for e in predicted[: max(0, room)]:
            if e in cache.entries or (nxt, e) in self.inflight:
                continue
            self.inflight[(nxt, e)] = self._executor.submit(self._read, nxt, e)
            self.inflight_bytes += self.expert_bytes[nxt]
            self.prefetch_issued += 1
        self._note_peak()

    def count_tokens(self, layer: int, tokens: int) -> None:
        if layer != 0:
            return
        self.tokens += tokens
        if self.tokens >= self._next_plan and self.config.policy in ("pinned", "auto"):
            self._next_plan = 2 * self.tokens
            self._replan()

    # -------------------------------------------------------- policies that learn

    def _replan(self) -> None:
        if self.config.policy == "pinned":
            for cache, k in zip(self.caches, self.top_k, strict=True):
                if not cache.pinned:
                    keep = max(0, cache.slots - k)
                    cache.pinned = {e for e, _ in cache.frequency.most_common(keep)}
            return
        self._auto_plan()

    def _auto_plan(self) -> None:
        """Policy and per-layer slots that the cache simulator says hit most on the requests so far."""
        traces = [s.trace for s in self.stats]
        best = None
        for policy in ("lru", "lfu"):
            curves = [self._hit_curve(t, n, policy) for t, n in zip(traces, self.num_experts, strict=True)]
            slots = self._split_by_gain(curves)
            hits = sum(curve[s] for curve, s in zip(curves, slots, strict=True))
            if best is None or hits > best[0]:
                best = (hits, policy, slots)
        hits, policy, slots = best
        self.policy = policy
        for cache, s in zip(self.caches, slots, strict=True):
            cache.policy, cache.slots = policy, s
            cache.trim(set())
        self.plans.append({"tokens": self.tokens, "policy": policy, "slots": slots, "simulated_hits": hits})

    @staticmethod
    def _hit_curve(trace: list[int], num_experts: int, policy: str) -> list[int]:
        """Simulated hits of `trace` at every size 0..E."""
        if policy == "lru":
            return [0, *lru_hit_counts(trace, num_experts)]
        return [simulate_cache(trace, size, policy) if size else 0 for size in range(num_experts + 1)]

    def _split_by_gain(self, curves: list[list[int]]) -> list[int]:
        """Each layer gets its top-k slots, then slot by slot to the layer that gains the most hits
        per byte (greedy on the simulated hit curves)."""
        slots = list(self.top_k)
        left = self.budget - sum(k * b for k, b in zip(slots, self.expert_bytes, strict=True))
        while True:
            best, gain = None, -1.0
            for i, curve in enumerate(curves):
                if slots[i] < self.num_experts[i] and self.expert_bytes[i] <= left:
                    g = (curve[slots[i] + 1] - curve[slots[i]]) / self.expert_bytes[i]
                    if g > gain:
                        best, gain = i, g
            if best is None:
                return slots
            slots[best] += 1
            left -= self.expert_bytes[best]

    # -------------------------------------------------------- report and detach

    def report(self) -> dict[str, Any]:
        """Hit rate, bytes read per token, the Belady optimum for the same request trace and slots,
        peak resident expert bytes and the process's peak resident memory; JSON-able."""
        layers = []
        requests = hits = belady_hits = belady_bytes = 0
        for index, ((name, _), cache, stats) in enumerate(
            zip(self.layers, self.caches, self.stats, strict=True)
        ):
            optimum = simulate_cache(stats.trace, cache.slots, "belady")
            layers.append(
                {
                    "layer": name,
                    "slots": cache.slots,
                    "requests": stats.requests,
                    "hits": stats.hits,
                    "prefetch_hits": stats.prefetch_hits,
                    "belady_hits": optimum,
                }
            )
            requests += stats.requests
            hits += stats.hits
            belady_hits += optimum
            belady_bytes += (stats.requests - optimum) * self._disk_bytes(index)
        tokens = max(1, self.tokens)
        return {
            "policy": self.config.policy,
            "policy_used": self.policy,
            "prefetch": self.config.prefetch,
            "budget_bytes": self.budget,
            "expert_bytes": self.total_expert_bytes,
            "tokens": self.tokens,
            "requests": requests,
            "hits": hits,
            "hit_rate": hits / requests if requests else None,
            "bytes_read": self.reader.bytes_read,
            "bytes_read_per_token": self.reader.bytes_read / tokens,
            "belady_hit_rate": belady_hits / requests if requests else None,
            "belady_bytes_read_per_token": belady_bytes / tokens,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_hits": sum(s.prefetch_hits for s in self.stats),
            "prefetch_wasted": self.prefetch_wasted,
            "peak_resident_expert_bytes": self.peak_resident,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "plans": self.plans,
            "layers": layers,
        }

    def _disk_bytes(self, layer: int) -> int:
        """Bytes one expert of `layer` takes on disk (its dtype there may differ from memory)."""
        total = 0
        for name, start, stop in self.layouts[layer].reads(0):
            location = self.reader.location(name)
            total += location.dtype.itemsize * (stop - start) * math.prod(location.shape[1:])
        return total

    def detach(self) -> None:
        """Put the model's own experts back and stop the prefetch thread (idempotent)."""
        if not self.attached:
            return
        self.attached = False
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for (_, moe), original in zip(self.layers, self._originals, strict=True):
            moe.experts = original
        self.inflight.clear()
        self.inflight_bytes = 0
        for cache in self.caches:
            cache.entries.clear()
        self._staging.clear()
        self.reader.close()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class OffloadedExperts(nn.Module):
    """Stands in for a layer's PackedExperts while offloaded: fetches the routed experts through
    the handle and runs the same grouped kernel on them, stacked in expert order."""

    def __init__(self, handle: OffloadHandle, layer: int, original: PackedExperts):
        super().__init__()
        self._handle = [handle]  # a list: not registered as a submodule
        self.layer = layer
        self.num_experts = original.num_experts
        self.hidden_size = original.hidden_size
        self.ff_size = original.ff_size
        self.activation = original.activation

    @property
    def handle(self) -> OffloadHandle:
        return self._handle[0]

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        handle = self.handle
        a = routing.compute_assignments
        handle.count_tokens(
            self.layer, int(routing.token_mask.sum()) if routing.token_mask.numel() else x.shape[0]
        )
        experts = torch.unique(a.expert).tolist()
        tensors = handle.fetch(self.layer, experts)
        handle.prefetch(self.layer, x)
        if not experts:
            return torch.zeros_like(x)
        stacked = {p: handle.stack(p, [t[p] for t in tensors], self.layer) for p in tensors[0]}
        local = torch.searchsorted(torch.tensor(experts, device=a.expert.device), a.expert)
        out = grouped_experts(
            x,
            a.token,
            local,
            a.weight,
            stacked["w_in"],
            stacked["w_out"],
            stacked.get("b_in"),
            stacked.get("b_out"),
            self.activation,
            weight_on=weight_on,
            backend=backend,
        )
        handle.finish_call(self.layer, experts)
        return out

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert on rows `x`, unweighted (as PackedExperts.expert_forward)."""
        (t,) = self.handle.fetch(self.layer, [expert])
        h = F.linear(x, t["w_in"], t.get("b_in"))
        return F.linear(self.activation.forward(h), t["w_out"], t.get("b_out"))


def attach(model: nn.Module, config: OffloadConfig) -> OffloadHandle:
    """Stream `model`'s routed experts from disk under `config` until the handle is detached."""
    if not isinstance(config, OffloadConfig):
        raise ConfigError("offload", f"expected an OffloadConfig, got {type(config).__name__}")
    return OffloadHandle(model, config)
