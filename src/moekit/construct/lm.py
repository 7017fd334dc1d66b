"""Upcycle a dense model trained by `moekit train` into an MoE of moekit's own LM.

The output folder is a run-like directory (`checkpoints/step-000000` + `latest`) that
`model.init_from` starts training from, and `moekit convert to-hf` exports; its receipt compares
the two models with moekit's forward on the run's own tokenizer and held-out text.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.construct.calibration import calibrate_dense
from moekit.construct.ffn import DenseFFN
from moekit.construct.hf import UpcycleRecipe
from moekit.construct.receipt import check_entry, held_out_token_batches, step_zero, write_receipt
from moekit.errors import MoekitError
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import RouterSpec
from moekit.train.checkpoint import (
    load_model_tensors,
    read_checkpoint_state,
    resolve_checkpoint,
    save_checkpoint,
)


def load_run_model(path: str | os.PathLike) -> tuple[LanguageModel, dict[str, Any]]:
    """The LM of a run or checkpoint directory (eval mode) and its state.json."""
    from moekit.io import load_tensors
    from moekit.train.checkpoint import MODEL_FILE

    directory = resolve_checkpoint(Path(path))
    state = read_checkpoint_state(directory)
    try:
        config = LMConfig.from_dict(dict(state["config"]["model"]))
    except (KeyError, TypeError) as exc:
        raise MoekitError(f"{directory}: state.json has no model config ({exc})") from None
    model = LanguageModel(config)
    load_model_tensors(
        model, load_tensors(directory / MODEL_FILE, "checkpoint model"), str(directory / MODEL_FILE)
    )
    return model.eval(), state


def moe_lm_config(config: LMConfig, recipe: UpcycleRecipe) -> LMConfig:
    """The dense config with an MoE in every layer (softmax top-k, renormalised: exact copies)."""
    ff = recipe.expert_ff_size(config.ff_size, "model.ff_size")
    spec = RouterSpec(num_experts=recipe.num_experts, top_k=recipe.top_k, renorm="sum")
    shared = recipe.shared_ff_size(config.ff_size)
    moe = MoEConfig(
        hidden_size=config.hidden_size,
        ff_size=ff,
        router=spec,
        num_shared_experts=1 if shared else 0,
        shared_ff_size=shared or None,
    )
    return dataclasses.replace(config, moe=moe, first_dense_layers=0, moe_every=1)


@torch.no_grad()
def upcycle_lm(
    dense: LanguageModel,
    recipe: UpcycleRecipe,
    *,
    means: list[Tensor] | None = None,
    acts: list[Tensor] | None = None,
) -> tuple[LanguageModel, dict[str, str]]:
    """The MoE LM of `dense` by `recipe`, and each tensor's provenance."""
    if dense.config.moe is not None:
        raise MoekitError(
            "the source model is already an MoE (model.moe is set); upcycling starts from a dense model"
        )
    config = moe_lm_config(dense.config, recipe)
    moe = LanguageModel(config).to(dense.embed.weight.dtype).eval()
    provenance: dict[str, str] = {}
    dense_state = dense.state_dict()
    for name, tensor in moe.state_dict().items():
        if ".ffn." not in name:
            tensor.copy_(dense_state[name])
            provenance[name] = f"copy of {name}"
    for i, (d_block, m_block) in enumerate(zip(dense.blocks, moe.blocks, strict=True)):
        gate, up = d_block.ffn.proj_in.weight.chunk(2, dim=0)
        experts, router, router_provenance = recipe.upcycle_layer(
            DenseFFN(gate, up, d_block.ffn.proj_out.weight),
            i,
            means=None if means is None else means[i],
            activations=None if acts is None else acts[i],
        )
        ffn = m_block.ffn
        ffn.experts.w_in.copy_(torch.cat([experts.gate, experts.up], dim=1))
        ffn.experts.w_out.copy_(experts.down)
        ffn.router.weight.copy_(router)
        source = f"blocks.{i}.ffn.proj_in/proj_out"
        provenance[f"blocks.{i}.ffn.experts.w_in"] = f"{source}: {experts.provenance}"
        provenance[f"blocks.{i}.ffn.experts.w_out"] = f"{source}: {experts.provenance}"
        provenance[f"blocks.{i}.ffn.router.weight"] = router_provenance
        if experts.shared is not None:
            ffn.shared.proj_in.weight.copy_(torch.cat([experts.shared.gate, experts.shared.up], dim=0))
            ffn.shared.proj_out.weight.copy_(experts.shared.down)
            provenance[f"blocks.{i}.ffn.shared.*"] = f"{source}: {experts.shared_provenance}"
    return moe, provenance


def _run_tokenizer(state: dict[str, Any]):
    """text -> ids with the run's tokenizer, and the run's corpus."""
    from moekit.data.lmdata import prepare_data

    data = state.get("config", {}).get("data", {})
    source = data.get("source", "builtin")
    if data.get("tokenizer", "byte") == "byte":
        from moekit.data.tokenizer import ByteTokenizer

        return ByteTokenizer().encode, source
    prepared = prepare_data(
        source, tokenizer="bpe", bpe_vocab_size=data.get("bpe_vocab_size", 4096), log=lambda _: None
    )
    return prepared.tokenizer.encode, source


def upcycle_run(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: UpcycleRecipe,
    *,
    corpus: str | None = None,
    prompts: list[list[str]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Upcycle the dense model of a moekit run or checkpoint into `dst`; returns the receipt."""
    from moekit.interop.hf import _write_dir

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise MoekitError(f"{dst}: already exists (pass --overwrite to replace it)")
    dense, state = load_run_model(src)
    if dense.config.moe is not None:
        raise MoekitError(f"{src}: the run's model is already an MoE (model.moe is set); upcycle a dense run")
    recipe.expert_ff_size(dense.config.ff_size, f"{src}: model.ff_size")
    encode, run_corpus = _run_tokenizer(state)
    corpus = corpus or run_corpus
    means, acts = calibrate_dense(
        dense,
        [(block.ffn, block.ffn.proj_out) for block in dense.blocks],
        recipe,
        vocab_size=dense.config.vocab_size,
        encode=encode,
        max_len=dense.config.max_seq_len,
        corpus=corpus,
        prompts=prompts,
    )
    moe, provenance = upcycle_lm(dense, recipe, means=means, acts=acts)
    batches, text = held_out_token_batches(
        dense.config.vocab_size, corpus=corpus, seq_len=min(64, dense.config.max_seq_len), encode=encode
    )
    dtype = dense.embed.weight.dtype

    def logits(model: LanguageModel):
        return lambda ids: model(ids).logits

    checks = {
        "step0_top_k": check_entry(step_zero(logits(dense), logits(moe), batches), recipe.exact, dtype, text)
    }
    if recipe.method == "split" and recipe.top_k < recipe.num_experts:
        all_on = LanguageModel(
            dataclasses.replace(
                moe.config,
                moe=dataclasses.replace(
                    moe.config.moe, router=moe.config.moe.router.with_(top_k=recipe.num_experts)
                ),
            )
        ).eval()
        all_on.load_state_dict(moe.state_dict())
        exact = recipe.noise == 0 and recipe.router == "zero"
        checks["step0_all_experts"] = check_entry(
            step_zero(logits(dense), logits(all_on), batches), exact, dtype, text
        )
    source_config = dict(state.get("config", {}))
    receipt = {
        "source": {"path": str(src), "family": "moekit", "kind": "moekit", "step": state.get("step")},
        "output": {"family": "moekit", "model": moe.config.to_dict()},
        "recipe": recipe.to_dict(),
        "seeds": {"experts": recipe.seed, "router": recipe.seed},
        "tensors": provenance,
        "checks": checks,
    }
    from moekit.construct.hf import _require_passed

    _require_passed(receipt, dst)
    new_state = {
        "config": {**source_config, "model": moe.config.to_dict()},
        "step": 0,
        "tokens_seen": 0,
        "upcycled_from": str(src),
        "domains": state.get("domains", []),
    }

    def fill(tmp: Path) -> None:
        save_checkpoint(tmp / "checkpoints" / "step-000000", moe, None, new_state)
        write_receipt(tmp, receipt)

    _write_dir(dst, fill, overwrite)
    return receipt
