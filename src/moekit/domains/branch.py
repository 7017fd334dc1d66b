"""Branch: copy a dense seed once per domain and continue training each copy on its own domain.

This is the first phase of Branch-Train-MiX (Sukhbaatar et al. 2024) and of BAM (#31). The seed
is a moekit run or checkpoint, or an HF dense (Llama, Qwen2, Qwen3) folder, loaded through
`model.init_from`; each branch is an ordinary `moekit train` run (same trainer, metrics and checkpoints) whose
training stream holds one domain. `parts: ffn` trains only the FFNs and keeps attention,
embeddings and norms at the seed's values, FlexOlmo's "coordinated" training (#30): the branches
then differ only in their FFNs, so a mixed model with one expert forced reproduces that branch.
`parts: flexolmo` is FlexOlmo's full coordinated training (`domains.coordinated`): each branch is a
2-expert MoE of the frozen public FFN and router row plus the owner's expert, router row (the
domain embedding) and negative-only bias, which alone train.

`branches.json`, written last, lists the runs; `moekit mix` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, MoekitError
from moekit.io import read_json, write_json_atomic

MANIFEST = "branches.json"
MANIFEST_FORMAT = "moekit-branches"
PARTS = ("all", "ffn", "flexolmo")


def is_ffn_parameter(name: str) -> bool:
    """Parameters of a block's FFN (dense, or an MoE's router and experts)."""
    return ".ffn." in name


def freeze_all_but_ffn(model) -> int:
    """Stop gradients to every non-FFN parameter; returns how many parameters stay trainable.
    AdamW skips parameters without a gradient, so frozen ones keep their exact values."""
    trainable = 0
    for name, p in model.named_parameters():
        keep = is_ffn_parameter(name)
        p.requires_grad_(keep)
        trainable += p.numel() if keep else 0
    return trainable


def run_config(
    name: str,
    out_dir: Path,
    init_from: str,
    data: dict[str, Any],
    train: dict[str, Any],
    seed: int,
    eval_batches: int,
    balance: dict[str, Any] | None = None,
):
    """The `moekit train` config of one branch (or of a post-mix training run)."""
    from moekit.train.config import RunConfig

    return RunConfig.from_dict(
        {
            "name": name,
            "out_dir": str(out_dir),
            "model": {"init_from": init_from},
            "data": data,
            "train": train,
            "loop": {"seed": seed, "log_every": 0, "eval_batches": eval_batches, "progress": False},
            **({"balance": balance} if balance else {}),
        }
    )


def train_run(config, data, parts: str, log: Callable[[str], None]):
    """Train one run on `data` (a `DomainData`), only the FFNs when `parts` is 'ffn'."""
    from moekit.train.trainer import Trainer

    trainer = Trainer(config, data=data, log=log)
    if parts == "ffn":
        freeze_all_but_ffn(trainer.model)
    elif parts == "flexolmo":
        from moekit.domains.coordinated import freeze_for_owner_training

        freeze_for_owner_training(trainer.model, trainer.optimizer)
    elif parts == "router":
        for name, p in trainer.model.named_parameters():
            p.requires_grad_(".ffn.router." in name or ".attn.router." in name)
    if parts != "flexolmo":
        return trainer.run()
    import warnings

    from moekit.balance.guard import BalancingDisabledWarning

    with warnings.catch_warnings():  # an owner's 2 experts are not balanced: the public one is frozen
        warnings.simplefilter("ignore", BalancingDisabledWarning)
        return trainer.run()


def branch(
    seed: str | os.PathLike,
    out_dir: str | os.PathLike,
    domains: Sequence[str],
    *,
    source: str = "sample",
    tokenizer: str = "byte",
    seq_len: int = 64,
    steps: int = 50,
    parts: str = "all",
    train: dict[str, Any] | None = None,
    run_seed: int = 0,
    eval_batches: int = 4,
    top_k: int = 2,
    bias: float = -0.5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one copy of `seed` per domain into `out_dir/<domain>`; returns the manifest (also
    written to `out_dir/branches.json`). `train` holds extra `train:` keys (lr, micro_batch_size...).
    With `parts='flexolmo'` each copy is FlexOlmo's 2-expert owner model (router `top_k`, initial
    negative bias `bias`), started from `out_dir/init/<domain>`."""
    from moekit.domains.data import DomainData, check_domains, corpus_path, load_data

    if parts not in PARTS:
        raise ConfigError("parts", f"got {parts!r}, expected one of {', '.join(PARTS)}")
    seed_path = Path(seed)
    if not seed_path.is_dir():
        raise MoekitError(f"{seed_path}: no such folder (expected a dense moekit run or HF folder)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MoekitError(f"{out}: already exists and is not empty; choose a new folder")
    base = load_data(source, tokenizer, log=lambda _: None)
    check_domains(domains, base.domains)
    _require_dense_seed(str(seed_path))
    data_section = {"source": source, "tokenizer": tokenizer, "seq_len": seq_len}
    train_section = {"steps": steps, **(train or {})}
    inits = {d: str(seed_path) for d in domains}
    if parts == "flexolmo":
        from moekit.domains.mix import MixOptions

        MixOptions(router="flexolmo", top_k=top_k, bias=bias)  # checks both before any work
        inits = _flexolmo_owner_inits(seed_path, out / "init", base, domains, seq_len, top_k, bias)
    configs = {
        d: run_config(f"branch-{d}", out / d, inits[d], data_section, train_section, run_seed, eval_batches)
        for d in domains
    }  # every config is checked before the first branch trains
    runs: dict[str, str] = {}
    val: dict[str, dict[str, float]] = {}
    for domain in domains:
        log(f"branch {domain}: {steps} steps from {seed_path} ({parts})")
        result = train_run(configs[domain], DomainData(base, [domain]), parts, log=lambda _: None)
        runs[domain] = domain
        val[domain] = result.val_loss
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "seed": str(seed_path.resolve()),
        "source": corpus_path(source),
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "parts": parts,
        "steps": steps,
        "domains": list(domains),
        "runs": runs,
        "val_loss": val,
        **({"flexolmo": {"top_k": top_k, "bias": bias}} if parts == "flexolmo" else {}),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _flexolmo_owner_inits(seed_path: Path, folder: Path, data, domains, seq_len, top_k, bias):
    """Each owner's untrained 2-expert model, saved as a checkpoint its branch run starts from.
    The router rows are the public model's domain embeddings over every domain (r_pub their mean),
    computed once so that every owner shares r_pub."""
    from moekit.domains.coordinated import owner_model
    from moekit.domains.data import calibration_ids
    from moekit.domains.mix import MixOptions, load_lm, router_rows_for
    from moekit.train.checkpoint import save_checkpoint

    public = load_lm(seed_path)
    seq = min(seq_len, public.config.max_seq_len)
    ids = [calibration_ids(data, d, seq_len=seq) for d in domains]
    rows = router_rows_for(MixOptions(router="flexolmo"), [], public, ids)
    inits = {}
    for j, domain in enumerate(domains):
        owner = owner_model(public, [r[[0, 1 + j]] for r in rows], top_k=top_k, bias=bias)
        state = {"config": {"model": owner.config.to_dict()}, "step": 0, "tokens_seen": 0}
        save_checkpoint(folder / domain / "checkpoints" / "step-000000", owner, None, state)
        inits[domain] = str(folder / domain)
    return inits


def _require_dense_seed(path: str) -> None:
    from moekit.train.init_from import init_model_config

    config = init_model_config(path)
    if config.get("moe") is not None:
        raise MoekitError(
            f"{path}: the seed is an MoE (model.moe is set); branching starts from a dense model"
        )


def read_branches(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a `branch` output folder, its run paths made absolute."""
    folder = Path(path)
    manifest = read_json(folder / MANIFEST, "branches manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise MoekitError(f"{folder / MANIFEST}: not a moekit branches manifest")
    manifest = dict(manifest)
    manifest["runs"] = {d: str((folder / r).resolve()) for d, r in manifest["runs"].items()}
    return manifest
