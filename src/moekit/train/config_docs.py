"""docs/config.md, generated from the run config's classes: every section and key, its type,
default, allowed values and meaning.

Types and defaults come from the dataclasses themselves, allowed values from the same constants
their validation uses, and meanings from the classes' docstrings (a "`key`: ..." clause) or, where
a docstring has none, from `MEANINGS` below. `python -m moekit.train.config_docs` rewrites the
file; `--check` exits 1 when the committed file is out of date (the test suite runs the check).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from moekit.balance.config import OBJECTIVE_KINDS, SCOPES, ObjectiveSpec
from moekit.balance.schedule import SCHEDULE_KINDS, Schedule
from moekit.data.loader import STREAMS
from moekit.device import DEVICES, DTYPES
from moekit.dispatch.grouped import BACKENDS
from moekit.experts.activations import ACTIVATION_NAMES
from moekit.experts.factory import EXPERT_KINDS
from moekit.experts.latent import LatentOptions
from moekit.experts.lora import LoRAOptions
from moekit.experts.smora import SMoRAOptions
from moekit.layer import MoEConfig
from moekit.models.attention_experts import AttentionExpertsConfig
from moekit.models.lm import ATTENTION_BIASES, LMConfig
from moekit.routing import spec as router_spec
from moekit.routing.factory import ROUTER_KINDS, _router_class
from moekit.routing.spec import RouterSpec
from moekit.train.config import LAYOUTS, TOKENIZERS, DataConfig, LoopConfig, OptimConfig, ParallelConfig
from moekit.train.methods import MethodConfig

DOCS_PATH = Path("docs/config.md")

# Allowed values of the string keys, from the constants their validation uses.
ALLOWED: dict[str, tuple[Any, ...]] = {
    "model.attention_bias": ATTENTION_BIASES,
    "data.tokenizer": TOKENIZERS,
    "data.layout": LAYOUTS,
    "data.stream": STREAMS,
    "train.device": DEVICES,
    "train.dtype": DTYPES,
    "loop.eval_split": ("validation", "test"),
    "model.moe.activation": ACTIVATION_NAMES,
    "model.moe.backend": BACKENDS,
    "model.moe.router_kind": ROUTER_KINDS,
    "model.moe.experts_kind": EXPERT_KINDS,
    "model.moe.router.preset": router_spec.PRESET_NAMES,
    "model.moe.router.score_fn": router_spec.SCORE_FUNCTIONS,
    "model.moe.router.score_timing": router_spec.SCORE_TIMINGS,
    "model.moe.router.group_score": router_spec.GROUP_SCORES,
    "model.moe.router.renorm": router_spec.RENORMS,
    "model.moe.router.weight_on": router_spec.WEIGHT_TARGETS,
    "model.moe.router.jitter_target": router_spec.JITTER_TARGETS,
    "model.moe.router.drop_policy": router_spec.DROP_POLICIES,
    "balance.objectives[].kind": OBJECTIVE_KINDS,
    "balance.objectives[].scope": SCOPES,
    "<schedule>.kind": SCHEDULE_KINDS,
}

# Meanings of the keys whose class docstring does not describe them key by key.
MEANINGS: dict[str, str] = {
    "name": "The run's name: progress bars, logs and the default output directory.",
    "out_dir": "Where metrics.jsonl and checkpoints/ go (default runs/<name>).",
    "data.stream": "How training rows are drawn: `mixed` (each batch row walks its own shuffled lane of "
    "documents, so a batch mixes domains and the loss does not swing by domain) or `sequential` "
    "(consecutive rows of one walk, the order before `mixed`; older checkpoints resume with it).",
    "data.source": "`builtin` (the built-in multi-domain corpus), `sample` (the small packaged sample) "
    "or a corpus directory.",
    "data.tokenizer": "`byte` (256 ids + specials) or `bpe` trained on the corpus.",
    "data.bpe_vocab_size": "Vocabulary size of the `bpe` tokenizer.",
    "data.seq_len": "Tokens per row of a batch (at most model.max_seq_len).",
    "data.layout": "`packed`: documents packed into rows with document-aware attention; `padded`: one "
    "document piece per row.",
    "data.holdout": "A domain left out of training (evaluated only), or null.",
    "data.single_domain_batches": "Every micro-batch from a single domain.",
    "data.cache_dir": "Where the tokenised corpus is cached (null: the default cache).",
    "train.steps": "Optimizer steps of the run.",
    "train.micro_batch_size": "Rows per micro-batch.",
    "train.grad_accum": "Micro-batches per optimizer step on every rank.",
    "train.lr": "Peak learning rate (AdamW).",
    "train.min_lr_ratio": "The cosine schedule's final learning rate as a fraction of `lr`.",
    "train.warmup_steps": "Linear warm-up steps before the cosine decay.",
    "train.weight_decay": "AdamW's decoupled weight decay.",
    "train.beta1": "AdamW's first-moment decay.",
    "train.beta2": "AdamW's second-moment decay.",
    "train.eps": "AdamW's epsilon.",
    "train.clip_grad_norm": "Clip the global gradient norm to this (0: no clipping).",
    "train.device": "`auto` (the GPU of each torchrun rank when CUDA is present, else the CPU), `cpu` or "
    "`cuda`. On CUDA the process groups use NCCL and the experts grouped_mm.",
    "train.dtype": "`fp32`, or `bf16`: bf16 autocast for the products over fp32 master weights and "
    "optimizer state; the router and balancing statistics stay fp32; no loss scaling.",
    "loop.seed": "Seed of the initialisation and the data order.",
    "loop.log_every": "Write a metrics.jsonl record every this many steps.",
    "loop.eval_every": "Evaluate every this many steps (0: at the end only).",
    "loop.eval_batches": "Batches per domain in each evaluation (0: all).",
    "loop.eval_split": "The split evaluations use.",
    "loop.checkpoint_every": "Checkpoint every this many steps (0: at the end only).",
    "loop.progress": "Show a progress bar.",
    "parallel.ep": "Expert-parallel size: ranks that share each MoE layer's experts; divides the world "
    "size and every layer's number of experts.",
    "methods.thor_alpha": "THOR-MoE's consistency loss weight (two forward passes; 0: off).",
    "methods.loramoe_weight": "LoRAMoE's localized balancing constraint weight (0: off).",
    "methods.loramoe_delta": "LoRAMoE's delta: the importance gap between the two expert types.",
    "methods.loramoe_knowledge_domains": "Domains whose tokens count as world-knowledge for LoRAMoE.",
    "methods.loramoe_form": "`intended` (CV^2(Q / I), which pulls each sample towards its matching "
    "expert group, as the paper intends) or `published` (the released CV^2(Q * I), which pushes it away).",
    "model.init_from": "Start step 0 from these weights: a moekit checkpoint or run directory (an "
    "upcycled one included) or an HF Llama / Mixtral / Qwen2-MoE folder. The model section's other keys "
    "replace the checkpoint's; LoRAMoE / SMoRA experts take its dense FFN as their frozen base.",
    "balance.objectives": "Auxiliary objectives added to the LM loss, each at most once per "
    "(kind, scope): a list of {kind, scope, coefficient}.",
    "balance.bias_update_rate": "Gamma of DeepSeek-V3's aux-loss-free balancing for routers with a "
    "selection bias (a schedule; 0: off).",
    "balance.objectives[].kind": "`load_balance` (E sum f_i P_i), `z_loss` (ST-MoE router z-loss) or "
    "`entropy` (mean routing entropy, for dynamic routing).",
    "balance.objectives[].scope": "Statistics over the `micro_batch`, each `sequence`, or the `global` "
    "batch (all micro-batches and ranks of a step).",
    "balance.objectives[].coefficient": "The objective's weight: a number or a schedule.",
    "<schedule>.kind": "`constant` (`start` throughout) or `linear` (`start` to `end` over `steps`).",
    "<schedule>.start": "The value at step 0.",
    "<schedule>.end": "The value from step `steps` on (linear only).",
    "<schedule>.steps": "Steps of the linear ramp.",
    "model.vocab_size": "Vocabulary size; `auto` takes the tokenizer's.",
    "model.hidden_size": "Width of the residual stream.",
    "model.num_layers": "Transformer blocks.",
    "model.num_heads": "Attention heads (hidden_size / num_heads must be even, for RoPE).",
    "model.ff_size": "Intermediate size of the dense FFNs (dense layers, dense models).",
    "model.max_seq_len": "Longest sequence the model takes.",
    "model.num_kv_heads": "Key/value heads for grouped-query attention (null: num_heads).",
    "model.rope_theta": "RoPE base.",
    "model.norm_eps": "RMSNorm epsilon.",
    "model.tie_embeddings": "Share the input embedding and the output head.",
    "model.init_std": "Standard deviation of the weights' initialisation.",
    "model.moe": "The MoE layers' configuration (absent: a dense model).",
    "model.first_dense_layers": "Layers before the first MoE layer that stay dense.",
    "model.moe_every": "After those, every this-many-th layer is MoE.",
    "model.attention_experts": "Every layer's attention as routed attention experts (BAM; absent: dense).",
    "model.parallel_block": "Attention and FFN both read the block input: x + Attn(norm(x)) + FFN(norm'(x)).",
    "model.attention_head_dim": "Size of each attention head (null: hidden_size / num_heads).",
    "model.attention_bias": "Attention biases: none, qkv (Qwen2) or all (q, k, v and output).",
    "model.qk_norm": "Per-head RMSNorm of queries and keys before RoPE (Qwen3).",
    "model.attention_experts.num_experts": "Attention experts per layer.",
    "model.attention_experts.top_k": "Attention experts per token; 0 = soft routing over all of them (BAM).",
    "model.attention_experts.shared_kv": "Experts own Q and O over one shared K/V projection (one KV cache).",
    "model.moe.ff_size": "Each routed expert's intermediate size.",
    "model.moe.router": "The router's selection rule (below); `preset: NAME` starts from an HF family.",
    "model.moe.activation": "The experts' activation.",
    "model.moe.swiglu_alpha": "`clamped_swiglu`'s alpha (GPT-OSS).",
    "model.moe.swiglu_limit": "`clamped_swiglu`'s clamp limit (GPT-OSS).",
    "model.moe.expert_bias": "Routed experts with biases (GPT-OSS).",
    "model.moe.num_shared_experts": "Always-on shared experts, fused into one FFN (DeepSeekMoE).",
    "model.moe.shared_ff_size": "Each shared expert's intermediate size (null: ff_size).",
    "model.moe.shared_gate": "A sigmoid gate on the shared experts' output (Qwen2-MoE).",
    "model.moe.backend": "Expert dispatch kernel: `auto` (by device and size), `loop` or `grouped_mm`.",
    "model.moe.router_kind": "The router: `token_choice` (configured by `router`) or a research router "
    "(options below).",
    "model.moe.router_options": "Options of the research router kind (see its table).",
    "model.moe.experts_kind": "The routed experts: `packed` FFNs or a research variant.",
    "model.moe.experts_options": "Options of the experts kind (see its table).",
    "model.moe.router.preset": "Start from an HF family's routing rule; the other keys override it.",
    "model.moe.router.num_experts": "Routed experts per MoE layer.",
    "model.moe.router.top_k": "Experts per token.",
    "model.moe.router.score_fn": "Scores from logits: softmax, sigmoid, or none (raw logits).",
    "model.moe.router.score_timing": "`before_topk` scores every expert then selects (Mixtral, Qwen, "
    "DeepSeek); `after_topk` selects on logits and scores only the chosen k (GPT-OSS, Granite, Llama 4).",
    "model.moe.router.selection_bias": "A per-expert fp32 bias added to the selection score only, never "
    "to the weight (DeepSeek-V3 aux-loss-free balancing; see balance.bias_update_rate).",
    "model.moe.router.num_groups": "Expert groups for group-limited selection (DeepSeek-V3).",
    "model.moe.router.topk_groups": "Groups kept per token, by group score.",
    "model.moe.router.group_score": "A group's score: the sum of its top 2, or its max.",
    "model.moe.router.renorm": "Divide the chosen weights by their sum, by their p-norm, or not.",
    "model.moe.router.renorm_p": "The p of `pnorm` renormalisation (DBRX).",
    "model.moe.router.renorm_eps": "Added to the renormalisation's denominator.",
    "model.moe.router.scaling": "Multiplies the final weights (DeepSeek's routed scaling factor).",
    "model.moe.router.weight_on": "Apply the routing weight to the expert's output, or its input (Llama 4).",
    "model.moe.router.router_bias": "The router's linear layer has a bias (GPT-OSS).",
    "model.moe.router.negative_bias": (
        "FlexOlmo: the bias enters as min(b, 0) on every expert but expert 0 (needs router_bias)."
    ),
    "model.moe.router.jitter_eps": "In training, multiply the router input by U(1-eps, 1+eps) (0: off).",
    "model.moe.router.jitter_target": "Whether the jittered input reaches the router only or the experts "
    "too (HF Mixtral).",
    "model.moe.router.capacity_factor": "null: dropless; else each expert keeps at most "
    "ceil(factor x assignments / experts).",
    "model.moe.router.drop_policy": "Which assignments an expert over capacity drops: by `position`, "
    "lowest `score`, or `random`.",
}

# Meanings of the research routers' and experts' options, by options class.
OPTION_MEANINGS: dict[str, str] = {
    "TopPOptions.p": "The probability mass each token's experts must reach, in (0, 1].",
    "NullExpertOptions.num_null": "Zero-compute experts added after the real ones (AdaMoE: as many).",
    "DynamicCapacityOptions.p": "The probability mass threshold over routed + null experts.",
    "DynamicCapacityOptions.num_null": "Null (zero-compute) experts.",
    "ExpertChoiceOptions.capacity_factor": "Each expert takes c * top_k * T / E tokens (1: as many expert "
    "computations as top-k routing).",
    "HashOptions.vocab_size": "Token ids the hash table covers.",
    "HashOptions.seed": "Seed of the table's generator.",
    "RecurrentOptions.state_size": "Width of the router's recurrent state.",
    "RecurrentOptions.cell": "The recurrent cell: `gru` (the paper) or a plain tanh `rnn`.",
    "RecurrentOptions.shared_cell": "One cell shared by every MoE layer.",
    "StochasticOptions.train_sampling": "Draw experts per `batch` or per `token` in training.",
    "StochasticOptions.eval_sampling": "Draw experts per `batch` or per `token` in evaluation.",
    "DenseToSparseOptions.temperature_max": "The Gumbel-softmax temperature at step 0.",
    "DenseToSparseOptions.temperature_min": "The final temperature.",
    "DenseToSparseOptions.schedule": "How the temperature decays.",
    "DenseToSparseOptions.decay_steps": "Steps of the decay (null: the run's steps).",
    "DenseToSparseOptions.threshold": "Gate values below it are dropped.",
    "DenseToSparseOptions.hard_after": "From this step on the gate is a hard top-k of the Gumbel sample "
    "(null: never).",
    "DenseToSparseOptions.weights": "The selected experts' weights: the gate (`gumbel`) or softmax(W x) "
    "(`softmax`).",
    "CosineOptions.dim": "Width of the projection the prototypes live in (null: the hidden space).",
    "CosineOptions.temperature": "The cosine scores' temperature.",
    "ChainOptions.iterations": "Routed iterations through the experts per layer.",
    "ChainOptions.inner_residual": "A residual connection around each iteration.",
    "ChainOptions.shared_router": "One router for every iteration (else one each).",
    "LatentOptions.latent_size": "Width of the shared latent space (at most the hidden size).",
    "LoRAOptions.rank": "Rank of each expert's low-rank adapter.",
    "LoRAOptions.alpha": "Adapter scale alpha / rank, as in LoRA.",
    "LoRAOptions.freeze_base": "Train the adapters only, the base FFN frozen (the paper).",
    "SMoRAOptions.alpha": "Adapter scale alpha / R for R ranks.",
    "SMoRAOptions.freeze_base": "Train the rank experts only, the base FFN frozen (the paper).",
}


@dataclass(frozen=True)
class Key:
    path: str
    type: str
    default: str
    allowed: str
    meaning: str


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if not hasattr(hint, "__args__") else None
    text = text or str(hint)
    text = re.sub(r"\b(?:[a-z_]+\.)+([A-Za-z_]+)", r"\1", text.replace("typing.", ""))
    return {"ObjectiveSpec": "objective", "Schedule": "number or schedule"}.get(text, text).replace(
        "tuple[ObjectiveSpec, ...]", "list of objectives"
    )


def _default(f: Field) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, Schedule):
        return repr(value.start) if value.kind == "constant" else "schedule"
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value).replace("'", "")


def docstring_meaning(cls: type, name: str) -> str | None:
    """The "`name`: ..." (or "`name` ...") clause of the class docstring, if it has one."""
    doc = " ".join((cls.__doc__ or "").split())
    match = re.search(
        rf"`{re.escape(name)}`(?:, `[a-z_]+`)*[^`;.]*?(?::|\s)\s*(.+?)(?:;\s|\.\s|\s-\s`|$)", doc
    )
    if match is None:
        return None
    clause = match.group(0).strip().rstrip(";.")
    clause = re.sub(r"\s-$", "", clause)
    return clause[0].upper() + clause[1:] + "." if clause else None


def _meaning(path: str, cls: type, name: str) -> str:
    return (
        MEANINGS.get(path)
        or OPTION_MEANINGS.get(f"{cls.__name__}.{name}")
        or docstring_meaning(cls, name)
        or ""
    )


def section_keys(prefix: str, cls: type, skip: tuple[str, ...] = ()) -> list[Key]:
    hints = get_type_hints(cls)
    keys = []
    for f in fields(cls):
        if f.name in skip:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        allowed = ALLOWED.get(path)
        keys.append(
            Key(
                path,
                _type_name(hints[f.name]),
                _default(f),
                ", ".join(str(a) for a in allowed) if allowed else "",
                _meaning(path, cls, f.name),
            )
        )
    return keys


def _option_classes() -> list[tuple[str, str, type]]:
    """(section title, key prefix, options class) of every research router and experts kind."""
    out = []
    for kind in ROUTER_KINDS:
        classes = _router_class(kind)
        if classes is not None:
            out.append((f"router_kind: {kind}", "model.moe.router_options", classes[1]))
    for kind, cls in (("latent", LatentOptions), ("lora", LoRAOptions), ("smora", SMoRAOptions)):
        out.append((f"experts_kind: {kind}", "model.moe.experts_options", cls))
    return out


def all_sections() -> list[tuple[str, str, list[Key]]]:
    """(title, description, keys) of every section, in the order of a config file."""

    def describe(cls: type) -> str:
        return " ".join((cls.__doc__ or "").split())

    top = [
        Key("name", "str", "run", "", MEANINGS["name"]),
        Key("out_dir", "str", "runs/<name>", "", MEANINGS["out_dir"]),
    ]
    preset = Key(
        "model.moe.router.preset",
        "str",
        "null",
        ", ".join(router_spec.PRESET_NAMES),
        MEANINGS["model.moe.router.preset"],
    )
    schedule = [
        Key(f"<schedule>.{k.path.rsplit('.', 1)[1]}", k.type, k.default, k.allowed, k.meaning)
        for k in section_keys("<schedule>", Schedule, skip=("label",))
    ]
    sections = [
        ("Top level", "", top),
        (
            "model",
            describe(LMConfig),
            [
                Key("model.init_from", "str", "null", "", MEANINGS["model.init_from"]),
                *section_keys("model", LMConfig),
            ],
        ),
        (
            "model.moe",
            describe(MoEConfig).split(" `ff_size`")[0],
            section_keys("model.moe", MoEConfig, ("hidden_size",)),
        ),
        (
            "model.moe.router",
            "The token-choice routing rule.",
            [preset, *section_keys("model.moe.router", RouterSpec)],
        ),
    ]
    sections.append(
        (
            "model.attention_experts",
            describe(AttentionExpertsConfig),
            section_keys("model.attention_experts", AttentionExpertsConfig),
        )
    )
    for title, prefix, cls in _option_classes():
        sections.append((f"model.moe ({title})", "", section_keys(prefix, cls)))
    sections += [
        ("data", describe(DataConfig), section_keys("data", DataConfig)),
        ("train", describe(OptimConfig), section_keys("train", OptimConfig)),
        ("loop", describe(LoopConfig), section_keys("loop", LoopConfig)),
        ("parallel", describe(ParallelConfig), section_keys("parallel", ParallelConfig)),
        ("balance", "How the routers are kept balanced.", section_keys("balance", _BalanceFields)),
        (
            "balance.objectives[]",
            describe(ObjectiveSpec),
            section_keys("balance.objectives[]", ObjectiveSpec),
        ),
        (
            "Schedules",
            "A coefficient or rate is a number (constant) or a mapping: " + describe(Schedule),
            schedule,
        ),
        ("methods", describe(MethodConfig), section_keys("methods", MethodConfig)),
    ]
    return sections


@dataclass(frozen=True)
class _BalanceFields:
    """The balance section as written in a config (BalanceConfig reads it with its own parser)."""

    objectives: list = ()  # type: ignore[assignment]
    bias_update_rate: Schedule = 0.0  # type: ignore[assignment]


def render() -> str:
    lines = [
        "# Run configuration",
        "",
        "<!-- generated by `python -m moekit.train.config_docs`; do not edit by hand -->",
        "",
        "A run is one YAML file (see `configs/`), read by `moekit train --config FILE`; any key can be",
        "overridden with `--set section.key=value`. Unknown keys, wrong types and values outside the",
        "allowed ones are reported with the key's name and exit status 2.",
        "",
        "Example configs: `configs/dense.yaml` (dense), `configs/tiny-moe.yaml` (MoE),",
        "`configs/deepseek-style.yaml` (aux-loss-free bias, groups), `configs/top-p.yaml` and",
        "`configs/router-*.yaml` (each research router), `configs/expert-parallel.yaml` (EP),",
        "`configs/bf16.yaml` (bf16 mixed precision), `configs/gpu.yaml` (CUDA + bf16).",
    ]
    for title, description, keys in all_sections():
        lines += ["", f"## {title}", ""]
        if description:
            lines += [description, ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for k in keys:
            cells = [f"`{k.path}`", k.type, f"`{k.default}`", k.allowed, k.meaning]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit.train.config_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("--out", type=Path, default=DOCS_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m moekit.train.config_docs", file=sys.stderr)
            return 1
        return 0
    from moekit.io import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
