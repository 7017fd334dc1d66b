"""KV-cached generation for every model moekit runs: its own `LanguageModel` and the HF families
`moekit.from_hf` loads (`FamilyModel`).

Prompts of different lengths are left-padded (`attention_mask` 0 on padding), positions count real
tokens only, and finished rows continue with the pad token, as transformers' `generate` does, so
that greedy decoding gives transformers' tokens. Sampling applies temperature, then top-k, then
top-p (nucleus), in transformers' order. A family model's one-token steps run through its
`DecodePlan` (`interop/decode_plan.py`: the forward's calls, their checks made once per
generation), where it covers the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moekit.dispatch.workers import single_threaded, too_small_to_share
from moekit.errors import ConfigError, MoekitError, require_int, require_number
from moekit.inference.step_threads import step_threads_of
from moekit.routing.override import Overrides, RoutingOverride, override_routing

if TYPE_CHECKING:
    from moekit.interop.decode_plan import DecodePlan


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. `top_k` 0 and `top_p` 1.0 switch those filters off; `eos_token_id`
    (one id or several) ends a row; `pad_token_id` fills finished rows (default: the first eos)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        require_int("max_new_tokens", self.max_new_tokens, minimum=0)
        require_number("temperature", self.temperature, minimum=0.0, strict=True)
        require_int("top_k", self.top_k, minimum=0)
        require_number("top_p", self.top_p, minimum=0.0, strict=True)
        if self.seed is not None:
            require_int("seed", self.seed, minimum=0)
        if self.top_p > 1.0:
            raise ConfigError("top_p", f"got {self.top_p}, expected a number in (0, 1]")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(i) for i in self.eos_token_id]


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Next-token logits [B, V] after temperature, top-k and top-p (Holtzman et al. 2020, nucleus
    sampling: keep the smallest set of tokens whose probability reaches p); removed tokens -inf."""
    logits = logits / temperature if temperature != 1.0 else logits
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1] = False  # always keep the most probable token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _model_kind(model: nn.Module) -> str:
    from moekit.interop.model import FamilyModel
    from moekit.models.lm import LanguageModel

    if isinstance(model, FamilyModel):
        return "family"
    if isinstance(model, LanguageModel):
        return "lm"
    raise MoekitError(
        f"{type(model).__name__}: generation runs moekit's LanguageModel and the models moekit.from_hf "
        "loads (FamilyModel)"
    )


def _check_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, max_new: int) -> Tensor:
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.int32, torch.int64)
    ):
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise MoekitError(f"input_ids: expected an integer tensor [batch, prompt length], got {shape}")
    if input_ids.shape[1] == 0:
        raise MoekitError("input_ids: the prompt is empty; expected at least one token")
    vocab = model.embed.num_embeddings
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise MoekitError(f"input_ids: token ids must lie in [0, {vocab}) (the model's vocabulary)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    elif attention_mask.shape != input_ids.shape:
        raise MoekitError(
            f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(torch.bool)
    if not bool(attention_mask.any(-1).all()):
        raise MoekitError("attention_mask: a row has no real token; every prompt needs at least one")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise MoekitError("attention_mask: expected left padding (zeros before the tokens of each row)")
    context = model.context_length
    if input_ids.shape[1] + max_new > context:
        raise MoekitError(
            f"input_ids: the prompt has {input_ids.shape[1]} tokens and max_new_tokens={max_new}, "
            f"more than the model's context of {context} positions"
        )
    return attention_mask


def largest_weight(model: nn.Module) -> int:
    """Elements of the largest weight matrix a decoding step reads whole (an expert's matrix
    counts as one: a token reads its chosen experts' only)."""
    from moekit.layer import MoE

    expert_params = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
    largest = 0
    for p in model.parameters():
        if p.dim() < 2 or p is getattr(getattr(model, "embed", None), "weight", None) and not _tied(model):
            continue
        largest = max(largest, p[0].numel() if id(p) in expert_params else p.numel())
    return largest


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return head is not None and head.weight is model.embed.weight


def threads_may_pay_off(rows: int, largest_elements: int, element_size: int) -> bool:
    """Whether a step over `rows` tokens may run faster on all threads than on one, and so is
    worth timing both ways (`moekit.inference.step_threads`).

    Its largest product, estimated on one core (the rough rates of `dispatch.workers`), must take
    long enough to pay a hand-off between threads: decoding a small model is a chain of tiny ops,
    each of which a second thread only delays (and, on a loaded machine, waits for); such steps run
    on one thread without being timed."""
    return not too_small_to_share(largest_elements * element_size, 2 * rows * largest_elements)


def _forward(
    model: nn.Module, kind: str, ids: Tensor, real: Tensor | None, positions: Tensor, cache: Any
) -> Tensor:
    """Logits [B, V] of the step's last position (`real` None: every new token is real)."""
    if kind == "family":
        mask = None if real is None else real.long()
        out = model(ids, attention_mask=mask, position_ids=positions, cache=cache)
    else:
        out = model(ids, positions=positions, token_mask=real, cache=cache)
    logits = out.logits[:, -1]
    return logits if logits.dtype == torch.float32 else logits.float()


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper per op than no_grad)
def stream(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    overrides: Overrides | dict[int | str, RoutingOverride] | RoutingOverride | None = None,
    offload: Any = None,
    report: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Tensor]:
    """Yield each step's new tokens [B] as they are decoded (options as `GenerationConfig`).
    Rows that finished yield the pad token. `report`, if given, receives the offload handle's
    report (under "offload") when the stream ends."""
    config = GenerationConfig(**options)
    kind = _model_kind(model)
    real = _check_inputs(model, input_ids, attention_mask, config.max_new_tokens)
    if config.max_new_tokens == 0:
        return
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_ids or [0])[0]
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    with contextlib.ExitStack() as stack:
        if offload is not None:
            handle = stack.enter_context(_attach_offload(model, offload))
        if overrides is not None:
            stack.enter_context(override_routing(model, overrides))
        was_training = model.training
        model.eval()
        stack.callback(model.train, was_training)
        cache = model.new_cache(capacity=input_ids.shape[1] + config.max_new_tokens)
        positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step_ids, step_real, step_positions = input_ids.long(), real, positions
        largest = largest_weight(model)
        element_size = next(model.parameters()).element_size()
        step_threads = step_threads_of(model)
        timed_by_rows: dict[int, bool] = {}  # whether threads may pay depends on the rows only
        plan = _Plan(model, kind)
        for _ in range(config.max_new_tokens):
            rows = step_ids.numel()
            if rows not in timed_by_rows:
                timed_by_rows[rows] = threads_may_pay_off(rows, largest, element_size)
            # every step in inference mode, the prompt's too: the expert loops' threads write
            # into the caller's tensors from C++ below autograd (`kernels/csrc/`), which inference
            # tensors allow
            with step_threads.step(rows) if timed_by_rows[rows] else single_threaded():
                one_token = step_real is None and step_ids.shape[1] == 1
                decode = plan.current(rows) if one_token else None
                if decode is not None:
                    logits = decode.step(step_ids, step_positions, cache)
                else:
                    logits = _forward(model, kind, step_ids, step_real, step_positions, cache)
            if config.do_sample:
                filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
                token = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                token = logits.argmax(-1)
            if len(eos):
                token = torch.where(finished, torch.full_like(token, pad), token)
            yield token
            if len(eos):
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            # a decode step's token is real in every row (finished rows continue with the pad
            # token, attended as transformers' generate attends it)
            step_ids, step_real = token[:, None], None
            step_positions = step_positions[:, -1:] + 1
        if offload is not None and report is not None:
            report["offload"] = handle.report()


class _Plan:
    """The `DecodePlan` of a generation's one-token steps of `rows` rows, built at the first and
    again where it no longer holds; None where the model's steps take another path (other models,
    offloaded experts, overrides that change routing)."""

    def __init__(self, model: nn.Module, kind: str):
        self.model = model
        self.family = kind == "family"
        self.plan: DecodePlan | None = None
        self.built_for: int | None = None

    def current(self, rows: int) -> DecodePlan | None:
        if not self.family:
            return None
        plan = self.plan
        if self.built_for != rows or (plan is not None and not plan.current()):
            from moekit.interop.decode_plan import DecodePlan

            plan = self.plan = DecodePlan.build(self.model, rows)
            self.built_for = rows
        return plan


def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    overrides: Overrides | dict[int | str, RoutingOverride] | RoutingOverride | None = None,
    offload: Any = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """The prompt followed by the generated tokens, [B, prompt + new] (fewer new tokens when every
    row reached `eos_token_id`). `overrides` change routing while generating
    (`moekit.routing.override`); `offload` (`moekit.inference.offload.OffloadConfig`) streams the
    routed experts from the checkpoint instead of holding them in memory."""
    tokens = list(
        stream(
            model,
            input_ids,
            attention_mask,
            overrides=overrides,
            offload=offload,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
        )
    )
    if not tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)


def _attach_offload(model: nn.Module, offload: Any) -> Any:
    """`moekit.inference.offload.attach(model, offload)`, imported only when asked for."""
    try:
        from moekit.inference.offload import attach
    except ImportError as exc:
        raise MoekitError(f"offload: expert offloading is not available in this install ({exc})") from None
    return attach(model, offload)
