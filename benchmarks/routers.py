"""Every research router and expert type trained on the built-in corpus under one budget.

    .venv/bin/python benchmarks/routers.py --steps 300 --out runs/bench/routers.json

For each method: per-domain validation loss (nats/token), mean real experts per token (routed
compute; null experts and shared experts not counted) over the validation tokens, and training
tokens/s. All methods share the model shape, data stream, optimiser and step count; the expert
widths are set so a token touches the same number of expert parameters as the top-2 baseline
(dynamic-k methods match it only on average, which the experts-per-token column shows).

Every method trains with the project trainer (`moekit.train`): its per-method extras (THOR's two
passes, LoRAMoE's typed constraint, the dense-to-sparse temperature schedule) are the trainer's
`methods` section and step hook, so what this table measures is what `moekit train` runs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moekit.data.lmdata import LanguageModelData, prepare_data
from moekit.errors import MoekitError
from moekit.io import write_json_atomic
from moekit.models.lm import LanguageModel
from moekit.train.config import RunConfig
from moekit.train.methods import run_model
from moekit.train.trainer import Trainer

# LoRAMoE's two sample types on this corpus: prose ("world knowledge") vs the rest.
KNOWLEDGE_DOMAINS = ("english", "multilingual")


@dataclass(frozen=True)
class Settings:
    steps: int = 300
    micro_batch_size: int = 16
    seq_len: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_experts: int = 8
    expert_ff: int = 64  # each routed expert of the top-2 baseline
    lr: float = 3e-3
    eval_batches: int = 4
    seed: int = 0
    source: str = "builtin"
    out_dir: Path = Path("runs/bench/routers")


@dataclass(frozen=True)
class Method:
    """One table row: the MoE section of the model config and the method's training extras.

    - `moe`: `MoEConfig` fields (router as a mapping) replacing the baseline's.
    - `balance`: `BalanceConfig` mapping (objectives, bias update rate).
    - `thor_alpha`: > 0 trains with THOR's two passes and consistency term.
    - `loramoe_delta`, `loramoe_weight`: LoRAMoE's localised constraint on the typed domains.
    """

    name: str
    paper: str
    moe: dict[str, Any] = field(default_factory=dict)
    balance: dict[str, Any] = field(default_factory=dict)
    thor_alpha: float = 0.0
    loramoe_delta: float = 0.0
    loramoe_weight: float = 0.0


LBL = {"kind": "load_balance", "scope": "global", "coefficient": 0.01}
Z = {"kind": "z_loss", "scope": "global", "coefficient": 0.001}


def methods(s: Settings, vocab_size: int) -> list[Method]:
    """The compared methods at the baseline's active expert parameters (2 experts of `expert_ff`)."""
    e, ff = s.num_experts, s.expert_ff
    d = s.hidden_size

    def router(top_k: int, **axes: Any) -> dict[str, Any]:
        return {"num_experts": e, "top_k": top_k, **axes}

    std = {"objectives": [LBL, Z]}
    return [
        Method("top-2 (baseline)", "Switch/GShard", {"router": router(2, renorm="sum")}, std),
        Method(
            "top-p p=0.4 + entropy",
            "#9",
            {"router": router(e), "router_kind": "top_p", "router_options": {"p": 0.4}},
            {"objectives": [LBL, Z, {"kind": "entropy", "scope": "global", "coefficient": 0.01}]},
        ),
        Method(
            "null experts m=E, k'=4",
            "#34",
            {
                "router": router(4, renorm="sum"),
                "router_kind": "null_experts",
                "router_options": {"num_null": e},
            },
            std,
        ),
        Method(
            "dynamic capacity p=0.7",
            "#2",
            {
                "router": router(e, renorm="sum"),
                "router_kind": "dynamic_capacity",
                "router_options": {"p": 0.7, "num_null": 1},
                "num_shared_experts": 1,
                "shared_ff_size": ff,
            },
            std,
        ),
        Method(
            "expert choice c=1 (non-causal)",
            "Zhou'22/#24",
            {"router": router(2), "router_kind": "expert_choice", "router_options": {"capacity_factor": 1.0}},
            {"objectives": [Z]},
        ),
        Method(
            "hash k=2",
            "Roller'21",
            {"router": router(2), "router_kind": "hash", "router_options": {"vocab_size": vocab_size}},
            {},
        ),
        Method(
            "recurrent GRU",
            "#16",
            {
                "router": router(2, renorm="sum"),
                "router_kind": "recurrent",
                "router_options": {"state_size": d},
            },
            std,
        ),
        Method(
            "THOR stochastic (2x ff)",
            "#33",
            {"router": router(1), "router_kind": "stochastic", "ff_size": 2 * ff},
            {},
            thor_alpha=1.0,
        ),
        Method(
            "dense-to-sparse gate",
            "#51",
            {
                "router": router(2),
                "router_kind": "dense_to_sparse",
                "router_options": {
                    "temperature_max": 2.0,
                    "temperature_min": 0.3,
                    "decay_steps": max(1, s.steps // 2),
                    "hard_after": max(1, s.steps // 2),
                },
            },
            std,
        ),
        Method(
            "cosine prototypes",
            "#18/#23",
            {"router": router(2, renorm="sum"), "router_kind": "cosine", "router_options": {"dim": 16}},
            {"objectives": [LBL]},
        ),
        Method(
            "chain-of-experts C=2 (1+1 of E)",
            "#25",
            {"router": router(2, renorm="sum"), "router_kind": "chain", "router_options": {"iterations": 2}},
            std,
        ),
        Method(
            "latent experts r=d/2 (2x ff)",
            "#14",
            {
                "router": router(2, renorm="sum"),
                "experts_kind": "latent",
                "experts_options": {"latent_size": d // 2},
                "ff_size": 2 * ff,
            },
            std,
        ),
        Method(
            "LoRAMoE (base 2ff, trained)",
            "#36",
            {
                "router": router(e),
                "experts_kind": "lora",
                "experts_options": {"rank": 4, "freeze_base": False},
                "ff_size": 2 * ff,
            },
            {"objectives": [Z]},
            loramoe_delta=0.1,
            loramoe_weight=0.01,
        ),
        Method(
            "SMoRA 4 of 32 ranks (base 2ff, trained)",
            "#47",
            {
                "router": {"num_experts": 32, "top_k": 4, "selection_bias": True, "renorm": "sum"},
                "experts_kind": "smora",
                "experts_options": {"freeze_base": False},
                "ff_size": 2 * ff,
            },
            {"objectives": [Z], "bias_update_rate": 0.001},
        ),
    ]


@dataclass
class Result:
    name: str
    paper: str
    val_loss: dict[str, float]
    experts_per_token: float
    tokens_per_s: float
    active_expert_params: int
    note: str = ""


def run_config(method: Method, s: Settings) -> RunConfig:
    """The method as a project run config: same model shape, data, schedule and seed for all."""
    model = {
        "vocab_size": "auto",
        "hidden_size": s.hidden_size,
        "num_layers": s.num_layers,
        "num_heads": s.num_heads,
        "ff_size": 2 * s.expert_ff,
        "max_seq_len": s.seq_len,
        "moe": {"ff_size": s.expert_ff, **method.moe},
    }
    return RunConfig.from_dict(
        {
            "name": method.name,
            "out_dir": str(s.out_dir / method.name.split(" ")[0]),
            "model": model,
            "data": {"source": s.source, "seq_len": s.seq_len},
            "train": {
                "steps": s.steps,
                "micro_batch_size": s.micro_batch_size,
                "lr": s.lr,
                "warmup_steps": max(1, s.steps // 20),
            },
            "loop": {"seed": s.seed, "log_every": 0, "eval_batches": s.eval_batches, "progress": False},
            "balance": method.balance,
            "methods": {
                "thor_alpha": method.thor_alpha,
                "loramoe_weight": method.loramoe_weight,
                "loramoe_delta": method.loramoe_delta,
            },
        }
    )


@torch.no_grad()
def experts_per_token(trainer: Trainer, s: Settings) -> float:
    """Mean real (compute) experts per real token and MoE layer over the validation batches."""
    model, data = trainer.model, trainer.data
    model.eval()
    experts, tokens = 0, 0
    for domain in data.domains:
        batches = data.eval_batches(domain, "validation", batch_size=s.micro_batch_size, seq_len=s.seq_len)
        for index, batch in enumerate(batches):
            if index >= s.eval_batches:
                break
            for routing in run_model(model, batch).routings:
                experts += int(routing.experts_per_token()[routing.token_mask].sum())
                tokens += int(routing.token_mask.sum())
    model.train()
    return experts / max(tokens, 1)


def active_expert_parameters(model: LanguageModel, method: Method, s: Settings) -> int:
    """Expert parameters a token touches in one layer at the method's nominal k (shared experts and
    the frozen base of LoRA kinds included; dynamic-k methods at the baseline's k = 2)."""
    layer = model.moe_layers[0]
    config = layer.config
    per_expert = (
        layer.experts.expert_parameter_count()
        if hasattr(layer.experts, "expert_parameter_count")
        else sum(p[0].numel() for p in layer.experts.parameters())
    )
    k = (
        config.router.top_k
        if config.router_kind in ("token_choice", "recurrent", "cosine", "chain", "hash")
        else 2
    )
    if config.router_kind == "stochastic":
        k = 1
    if config.experts_kind in ("lora", "smora"):
        base = layer.experts.base_in.numel() + layer.experts.base_out.numel()
        return base + k * per_expert
    shared = sum(p.numel() for p in layer.shared.parameters()) if layer.shared is not None else 0
    latent = sum(p.numel() for n, p in layer.experts.named_parameters() if n.startswith("proj_"))
    return k * per_expert + shared + latent


def train_and_evaluate(method: Method, s: Settings, data: LanguageModelData) -> Result:
    """Train `method` with the project trainer for `s.steps` steps and evaluate it."""
    trainer = Trainer(run_config(method, s), data=data, log=lambda _: None)
    result = trainer.run()
    return Result(
        method.name,
        method.paper,
        result.val_loss,
        experts_per_token(trainer, s),
        result.tokens_per_s,
        active_expert_parameters(trainer.model, method, s),
    )


def table(results: list[Result], domains: tuple[str, ...]) -> str:
    head = ["method", "paper", *domains, "mean", "experts/token", "active expert params/layer", "train tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if r.note:
            cells = [r.name, r.paper, *("—" for _ in domains), "—", "—", "—", r.note]
        else:
            losses = [f"{r.val_loss.get(d, math.nan):.3f}" for d in (*domains, "mean")]
            cells = [
                r.name,
                r.paper,
                *losses,
                f"{r.experts_per_token:.2f}",
                f"{r.active_expert_params:,}",
                f"{r.tokens_per_s:,.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--seq-len", type=int, default=Settings.seq_len)
    parser.add_argument("--source", default=Settings.source, help="corpus: builtin, sample, or a directory")
    parser.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/routers.json"))
    args = parser.parse_args(argv)
    settings = replace(
        Settings(),
        steps=args.steps,
        seq_len=args.seq_len,
        source=args.source,
        out_dir=args.out.parent / "routers",
    )
    data = prepare_data(settings.source, log=lambda m: None)
    candidates = methods(settings, data.tokenizer.vocab_size)
    chosen = [m for m in candidates if not args.only or any(o in m.name for o in args.only)]
    results = []
    for method in chosen:
        try:
            result = train_and_evaluate(method, settings, data)
        except MoekitError as error:  # e.g. hash routing before the LM passes token ids
            result = Result(method.name, method.paper, {}, math.nan, math.nan, 0, note=f"not run: {error}")
        print(
            f"{method.name}: mean val {result.val_loss.get('mean', math.nan):.3f}, "
            f"{result.experts_per_token:.2f} experts/token, {result.tokens_per_s:,.0f} tok/s",
            flush=True,
        )
        results.append(result)
    shown = {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()}
    write_json_atomic(args.out, {"settings": shown, "results": [r.__dict__ for r in results]})
    print()
    print(table(results, data.domains))
    print()
    command = f".venv/bin/python benchmarks/routers.py --steps {settings.steps} --seq-len {settings.seq_len}"
    print(f"command: {command}")


if __name__ == "__main__":
    main()
