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

from moekit.errors import ConfigError, MoekitError, require_choice, require_int, require_number
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


# How `branch` names its inputs in errors: by default the parameter names; the CLI passes its
# options (`--steps`), `moekit build` its recipe fields (`branch.steps`).
FIELDS = {
    "seed": "seed",
    "out": "out_dir",
    "domains": "domains",
    "source": "source",
    "tokenizer": "tokenizer",
    "seq_len": "seq_len",
    "steps": "steps",
    "parts": "parts",
    "top_k": "top_k",
    "bias": "bias",
    "train": "train",
}
OWNER_EXPERTS = 2  # a FlexOlmo owner model: the public expert and the owner's own


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
    fields: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train one copy of `seed` per domain into `out_dir/<domain>`; returns the manifest (also
    written to `out_dir/branches.json`). `train` holds extra `train:` keys (lr, micro_batch_size...).
    With `parts='flexolmo'` each copy is FlexOlmo's 2-expert owner model (router `top_k` of 1 or
    2, initial negative bias `bias`), started from `out_dir/init/<domain>`.

    Every input is checked before anything is written; `fields` renames the inputs in errors
    (see FIELDS). A run refused before its first branch finished training leaves `out_dir` as
    it found it (absent or empty), so the corrected command can run into the same folder."""
    from moekit.domains.data import DomainData, check_domains, corpus_domains, corpus_path, load_data

    names = {**FIELDS, **(fields or {})}
    require_choice(names["parts"], parts, PARTS)
    require_int(names["steps"], steps, minimum=1)
    require_int(names["seq_len"], seq_len, minimum=2)
    require_choice(names["tokenizer"], tokenizer, ("byte", "bpe"))
    if parts == "flexolmo":
        require_int(names["top_k"], top_k, minimum=1)
        if top_k > OWNER_EXPERTS:
            raise ConfigError(
                names["top_k"],
                f"got {top_k}, expected 1 or 2 (a FlexOlmo owner model has {OWNER_EXPERTS} experts: "
                "the public one and its own)",
            )
        require_number(names["bias"], bias)
        if bias > 0:
            raise ConfigError(names["bias"], f"got {bias}, expected a number <= 0 (FlexOlmo's bias)")
    seed_path = Path(seed)
    if not seed_path.is_dir():
        raise MoekitError(f"{seed_path}: no such folder (expected a dense moekit run or HF folder)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoekitError(f"{out}: exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise MoekitError(f"{out}: already exists and is not empty; choose a new folder")
    check_domains(domains, corpus_domains(source, names["source"]), names["domains"])
    seed_config = _require_dense_seed(str(seed_path))
    positions = seed_config.get("max_seq_len")
    if isinstance(positions, int) and seq_len > positions:
        raise ConfigError(
            names["seq_len"],
            f"got {seq_len}, above the seed's model.max_seq_len={positions} ({seed_path}); "
            f"expected at most {positions}",
        )
    data_section = {"source": source, "tokenizer": tokenizer, "seq_len": seq_len}
    train_section = {"steps": steps, **(train or {})}

    def configs_from(inits: dict[str, str]) -> dict[str, Any]:
        try:
            return {
                d: run_config(
                    f"branch-{d}", out / d, inits[d], data_section, train_section, run_seed, eval_batches
                )  # fmt: skip
                for d in domains
            }
        except ConfigError as exc:
            raise _renamed(exc, names) from None

    # every config is checked before anything is written (FlexOlmo's on the seed: its owners'
    # starting checkpoints are written below, and differ from the seed only in the FFN)
    configs = configs_from({d: str(seed_path) for d in domains})
    base = load_data(source, tokenizer, log=lambda _: None, field=names["source"])
    vocab, needed = seed_config.get("vocab_size"), base.tokenizer.vocab_size
    if isinstance(vocab, int) and vocab < needed:
        raise ConfigError(
            names["seed"],
            f"{seed_path}: vocabulary of {vocab} tokens, the data's {tokenizer} tokenizer has {needed}; "
            "expected a seed whose vocabulary holds the tokenizer's",
        )
    created = not out.exists()
    trained = 0
    try:
        if parts == "flexolmo":
            configs = configs_from(
                _flexolmo_owner_inits(seed_path, out / "init", base, domains, seq_len, top_k, bias)
            )
        runs: dict[str, str] = {}
        val: dict[str, dict[str, float]] = {}
        for domain in domains:
            log(f"branch {domain}: {steps} steps from {seed_path} ({parts})")
            try:
                result = train_run(configs[domain], DomainData(base, [domain]), parts, log=lambda _: None)
            except ConfigError as exc:
                raise _renamed(exc, names) from None
            trained += 1
            runs[domain] = domain
            val[domain] = result.val_loss
    except BaseException:
        if not trained:
            _undo(out, created)
        raise
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


def _renamed(exc: ConfigError, names: dict[str, str]) -> ConfigError:
    """A run config's error under the name the user wrote (`train.steps` -> `--steps`)."""
    internal = {
        "train.steps": names["steps"],
        "data.seq_len": names["seq_len"],
        "data.source": names["source"],
        "data.tokenizer": names["tokenizer"],
    }
    field = internal.get(exc.field)
    if field is None and exc.field.startswith("train.") and names["train"] != "train":
        field = f"{names['train']}.{exc.field.split('.', 1)[1]}"
    if field is None:
        return exc
    return exc.renamed(field)


def _undo(out: Path, created: bool) -> None:
    """Remove what a refused `branch` wrote into `out` (which was absent or empty before)."""
    import shutil

    if not out.is_dir():
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


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


def _require_dense_seed(path: str) -> dict[str, Any]:
    """The seed's model config, which must be dense."""
    from moekit.train.init_from import init_model_config

    try:
        config = init_model_config(path)
    except ConfigError as exc:  # named after the seed, not the internal model.init_from
        raise MoekitError(exc.detail) from None
    if config.get("moe") is not None:
        raise MoekitError(
            f"{path}: the seed is an MoE (model.moe is set); branching starts from a dense model"
        )
    return config


def read_branches(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a `branch` output folder, its run paths made absolute. Every field `mix`
    reads is checked here; an error names the file and the field."""
    folder = Path(path)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise MoekitError(f"{folder}: no such folder (expected a branches folder with {MANIFEST})")
    if not file.is_file():
        raise MoekitError(f"{file}: not found (expected the branches folder written by moekit branch)")
    manifest = read_json(file, "branches manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise MoekitError(f"{file}: not a moekit branches manifest (expected format {MANIFEST_FORMAT!r})")
    missing = [k for k in ("domains", "runs", "seed", "source", "tokenizer", "seq_len") if k not in manifest]
    if missing:
        fields = ", ".join(repr(k) for k in missing)
        raise MoekitError(f"{file}: missing field{'s' if len(missing) > 1 else ''} {fields}")
    domains = manifest["domains"]
    if (
        not isinstance(domains, list)
        or not domains
        or not all(isinstance(d, str) and d for d in domains)
        or len(set(domains)) != len(domains)
    ):
        raise MoekitError(f"{file}: field 'domains' is {domains!r}, expected a list of distinct domain names")
    runs = manifest["runs"]
    if not isinstance(runs, dict):
        raise MoekitError(f"{file}: field 'runs' is {runs!r}, expected a mapping of domain to run folder")
    for domain in domains:
        run = runs.get(domain)
        if not isinstance(run, str) or not run:
            raise MoekitError(f"{file}: field 'runs' has no run folder for domain {domain!r}")
        if not (folder / run).is_dir():
            raise MoekitError(f"{file}: runs.{domain} is {run!r}, no such folder in {folder}")
    for key in ("seed", "source", "tokenizer"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise MoekitError(f"{file}: field {key!r} is {manifest[key]!r}, expected a non-empty string")
    seq_len = manifest["seq_len"]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MoekitError(f"{file}: field 'seq_len' is {seq_len!r}, expected an integer >= 2")
    parts = manifest.get("parts", "all")
    if parts not in PARTS:
        raise MoekitError(f"{file}: field 'parts' is {parts!r}, expected one of {', '.join(PARTS)}")
    manifest = dict(manifest)
    manifest["runs"] = {d: str((folder / runs[d]).resolve()) for d in domains}
    return manifest
