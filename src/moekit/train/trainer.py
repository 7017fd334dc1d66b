"""The training loop: global-batch gradient accumulation with moekit's balancing objectives,
AdamW + warm-up/cosine, clipping, per-domain evaluation, JSONL metrics, atomic checkpoints,
and bit-identical resumption.

Under torchrun (several processes) the same loop runs expert- and data-parallel: every rank builds
the same model and data stream, keeps its block of experts (`parallel.ep`), takes micro-batches
rank, rank + W, ... of the step's grad_accum x W, and the gradients are summed over the ranks that
share each parameter before global clipping and the optimizer step. The result is the single-process
run with grad_accum x W accumulation steps. Only rank 0 writes metrics, progress and checkpoints.

`train.device` places the model and every batch (on CUDA each torchrun rank takes its local GPU and
the process groups use NCCL); `train.dtype: bf16` runs each forward pass under autocast over the
fp32 weights (`moekit.device`). The rest of the loop is the same on every device.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.balance.bias import apply_bias_updates
from moekit.balance.guard import warn_if_unbalanced
from moekit.balance.step import StepReport, accumulate_gradients
from moekit.data.batch import Batch
from moekit.data.lmdata import LanguageModelData, prepare_data
from moekit.device import autocast, resolve_device, resolve_dtype, warn_if_slow_bf16
from moekit.distributed import checkpoint as distributed_checkpoint
from moekit.distributed.expert_parallel import make_expert_parallel
from moekit.distributed.grad_sync import clip_grad_norm, global_grad_norm, sync_gradients
from moekit.distributed.mesh import ParallelMesh, build_mesh
from moekit.errors import ConfigError, MoekitError
from moekit.kernels.record import apply_kernel_record, kernel_record
from moekit.models.lm import LanguageModel, count_parameters
from moekit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from moekit.train.config import RunConfig
from moekit.train.init_from import load_initial_weights
from moekit.train.methods import announce_step, lm_forward, make_forward
from moekit.train.metrics import MetricsLog, Progress
from moekit.train.optim import make_optimizer, set_learning_rate, warmup_cosine


@dataclass(frozen=True)
class MicroBatch:
    """A data batch as `accumulate_gradients` reads it (token mask, loss tokens, documents)."""

    batch: Batch

    @property
    def token_mask(self) -> torch.Tensor:
        return self.batch.token_mask

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.batch.doc_ids

    @property
    def num_loss_tokens(self) -> int:
        return self.batch.num_targets


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    data: LanguageModelData,
    seq_len: int,
    batch_size: int,
    split: str = "validation",
    max_batches: int | None = None,
    layout: str = "packed",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Mean next-token loss (nats per token) per domain, and their unweighted mean as `mean`;
    on the model's device, the products in `dtype` (bf16: autocast)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        for domain in data.domains:
            total, count = 0.0, 0
            for index, batch in enumerate(
                data.eval_batches(domain, split, batch_size=batch_size, seq_len=seq_len, layout=layout)
            ):
                if max_batches is not None and index >= max_batches:
                    break
                with autocast(device, dtype):
                    out = lm_forward(model, batch.to(device))
                total += float(out.loss_sum)
                count += batch.num_targets
            if count:
                losses[domain] = total / count
    finally:
        model.train(was_training)
    if losses:
        losses["mean"] = sum(losses.values()) / len(losses)
    return losses


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_train_loss: float
    val_loss: dict[str, float]
    tokens_per_s: float
    parameters: dict[str, int]


class Trainer:
    """Owns the model, optimizer, data stream and the step counter of one run.

    `mesh` is this rank's place in the expert/data-parallel layout; by default it is built from
    `config.parallel` over the initialised process group (a single process when there is none).
    """

    def __init__(
        self,
        config: RunConfig,
        data: LanguageModelData | None = None,
        log: Callable[[str], None] = print,
        dtype: torch.dtype = torch.float32,
        mesh: ParallelMesh | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.resumed_from: Path | None = None
        self.mesh = mesh if mesh is not None else build_mesh(config.parallel.ep)
        if self.mesh.ep != config.parallel.ep:
            raise ConfigError("parallel.ep", f"got {config.parallel.ep}, but the mesh has ep={self.mesh.ep}")
        self.log = log if self.mesh.is_main else _silent
        log = self.log
        self.out_dir = Path(config.out_dir)
        torch.manual_seed(config.loop.seed)
        d = config.data
        self.data = data or prepare_data(
            d.source,
            tokenizer=d.tokenizer,
            bpe_vocab_size=d.bpe_vocab_size,
            holdout=d.holdout,
            cache_dir=Path(d.cache_dir) if d.cache_dir else None,
            log=log,
        )
        self.model_config = config.model_config(self.data.tokenizer.vocab_size)
        if self.model_config.max_seq_len < d.seq_len:
            raise MoekitError(
                f"model.max_seq_len={self.model_config.max_seq_len} is shorter than data.seq_len={d.seq_len}"
            )
        t = config.train
        self.device = resolve_device(t.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        self.compute_dtype = resolve_dtype(t.dtype)
        warn_if_slow_bf16(self.compute_dtype, self.device)
        self.model = LanguageModel(self.model_config).to(dtype)
        if config.init_from is not None:  # the starting weights (an upcycled MoE, an HF checkpoint ...)
            if self.model_config.vocab_size < self.data.tokenizer.vocab_size:
                raise ConfigError(
                    "model.init_from",
                    f"{config.init_from}: vocabulary of {self.model_config.vocab_size} tokens, the data's "
                    f"tokenizer has {self.data.tokenizer.vocab_size}",
                )
            loaded = load_initial_weights(self.model, config.init_from)
            bases = f", base FFN of {len(loaded['bases'])} MoE layers" if loaded["bases"] else ""
            log(f"initialised from {config.init_from}: {len(loaded['copied'])} tensors{bases}")
        elif _has_frozen_random_base(self.model):
            warnings.warn(
                "adapter experts (LoRAMoE/SMoRA) on a frozen base FFN that is random: set model.init_from "
                "to a pretrained dense moekit checkpoint, or experts_options.freeze_base: false",
                RuntimeWarning,
                stacklevel=2,
            )
        self.parameters = count_parameters(self.model)
        make_expert_parallel(self.model, self.mesh)  # after counting: only this rank's experts remain
        self.model.to(self.device)
        self.forward = make_forward(self.model, config.methods, self.data.domains)
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        self.batches = self.data.train_batches(
            t.micro_batch_size,
            d.seq_len,
            layout=d.layout,
            seed=config.loop.seed,
            single_domain=d.single_domain_batches,
            stream=d.stream,
        )
        self.step = 0
        self.tokens_seen = 0

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": {**self.config.to_dict(), "model": self.model_config.to_dict()},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_state": self.batches.state_dict(),
            "domains": list(self.data.domains),
            "parameters": self.parameters.to_dict(),
            "kernels": kernel_record(self.dtype),
        }

    def save(self) -> Path:
        """Write a checkpoint (collective under several ranks: gathered experts, written by rank 0)."""
        directory = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        if self.mesh.distributed:
            path = distributed_checkpoint.save_checkpoint(
                directory, self.model, self.optimizer, self.state(), self.mesh
            )
        else:
            path = save_checkpoint(directory, self.model, self.optimizer, self.state())
        self.log(f"checkpoint: {path}")
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint saved at any expert-parallel size."""
        directory = resolve_checkpoint(path)
        self._check_same_model(directory)
        if self.mesh.distributed:
            state = distributed_checkpoint.load_checkpoint(directory, self.model, self.optimizer)
        else:
            state = load_checkpoint(directory, self.model, self.optimizer)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.batches.load_state_dict(state["data_state"])
        if isinstance(state.get("kernels"), dict):
            changed = apply_kernel_record(state["kernels"], self.dtype)
            if changed:
                self.log(f"kernels as recorded in the checkpoint: {', '.join(changed)}")
        self.resumed_from = directory
        self.log(f"resumed from {directory} at step {self.step}")

    def _check_same_model(self, directory: Path) -> None:
        """Refuse a checkpoint of another model config (before any tensor is loaded)."""
        from moekit.io import read_json
        from moekit.train.checkpoint import STATE_FILE

        state = read_json(directory / STATE_FILE, "checkpoint state")
        saved = state.get("config", {}).get("model") if isinstance(state, dict) else None
        ours = json.loads(json.dumps(self.model_config.to_dict()))
        if saved is None or saved == ours:
            return
        differing = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        detail = ", ".join(
            f"model.{k}: checkpoint {saved.get(k)!r}, config {ours.get(k)!r}" for k in differing[:3]
        )
        raise MoekitError(f"{directory}: checkpoint of another model config ({detail})")

    # -- the loop ----------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        t = self.config.train
        multiplier = warmup_cosine(self.step, t.warmup_steps, t.steps, t.min_lr_ratio)
        set_learning_rate(self.optimizer, t.lr, multiplier)
        mesh = self.mesh
        # Every rank draws the whole global batch and keeps its share, so the data stream (and its
        # checkpointed position) is the same on every rank and in a single process.
        drawn = [next(self.batches) for _ in range(t.grad_accum * mesh.world_size)]
        micro = [MicroBatch(batch.to(self.device)) for batch in drawn[mesh.rank :: mesh.world_size]]
        announce_step(self.model, self.step, t.steps)
        report = accumulate_gradients(
            self._forward,
            micro,
            self.config.balance,
            self.step,
            group=mesh.world_group,
        )
        if mesh.distributed:
            sync_gradients(self.model, mesh)
            if t.clip_grad_norm > 0:
                grad_norm = clip_grad_norm(self.model, mesh, t.clip_grad_norm)
            else:
                grad_norm = global_grad_norm(self.model, mesh)
        elif t.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rate = self.config.balance.bias_update_rate.value(self.step)
        if rate:
            apply_bias_updates(self.model, report.expert_counts, rate)
        self.step += 1
        self.tokens_seen += report.totals.num_tokens
        self.last_grad_norm = float(grad_norm)
        return report

    def _forward(self, micro: MicroBatch):
        """One micro-batch's forward pass in the run's precision (backward runs outside autocast)."""
        with autocast(self.device, self.compute_dtype):
            return self.forward(micro.batch)

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until `train.steps` (or `max_steps` more steps), evaluating and checkpointing on the way."""
        cfg = self.config
        main = self.mesh.is_main
        if main:
            warn_if_unbalanced(self.model, cfg.balance)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out_dir / "metrics.jsonl") if main else _NoMetrics()
        # Records past this step came from an attempt that was interrupted after its checkpoint:
        # they are dropped, so that every step is logged once, by the attempt that continued.
        metrics.keep_through(self.step)
        metrics.write(
            {
                "step": self.step,
                "event": "resume" if self.resumed_from is not None else "start",
                **({"checkpoint": str(self.resumed_from)} if self.resumed_from is not None else {}),
                "kernels": kernel_record(self.dtype),
            }
        )
        end = cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        counts = self.parameters
        self.log(f"{cfg.name}: {counts.total / 1e6:.2f}M parameters, {counts.active / 1e6:.2f}M active")
        if self.mesh.distributed:
            self.log(
                f"{self.mesh.world_size} ranks: expert-parallel {self.mesh.ep} x data-parallel {self.mesh.dp}"
            )
        progress = Progress(total=end, initial=self.step, enabled=cfg.loop.progress and main, desc=cfg.name)
        train_time, train_tokens, last_loss = 0.0, 0, math.nan
        val: dict[str, float] = {}
        try:
            while self.step < end:
                start = time.perf_counter()
                report = self.train_step()
                elapsed = time.perf_counter() - start
                train_time += elapsed
                train_tokens += report.totals.num_tokens
                last_loss = report.lm_loss
                tokens_per_s = train_tokens / train_time
                progress.update(loss=report.lm_loss, tokens_per_s=tokens_per_s)
                if cfg.loop.log_every and (self.step % cfg.loop.log_every == 0 or self.step == end):
                    record = {
                        "step": self.step,
                        "tokens": self.tokens_seen,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": self.last_grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "step_s": elapsed,
                    }
                    record.update(report.log_dict("train/"))
                    metrics.write(record)
                if cfg.loop.eval_every and self.step % cfg.loop.eval_every == 0 and self.step < end:
                    val = self.evaluate()
                    metrics.write(
                        {
                            "step": self.step,
                            "tokens": self.tokens_seen,
                            **{f"val/{k}": v for k, v in val.items()},
                        }
                    )
                if (
                    cfg.loop.checkpoint_every
                    and self.step % cfg.loop.checkpoint_every == 0
                    and self.step < end
                ):
                    self.save()
        finally:
            progress.close()
        val = self.evaluate()
        metrics.write(
            {"step": self.step, "tokens": self.tokens_seen, **{f"val/{k}": v for k, v in val.items()}}
        )
        self.save()
        return TrainResult(
            out_dir=self.out_dir,
            steps=self.step,
            final_train_loss=last_loss,
            val_loss=val,
            tokens_per_s=train_tokens / train_time if train_time else 0.0,
            parameters=self.parameters.to_dict(),
        )

    def evaluate(self, split: str | None = None) -> dict[str, float]:
        """Per-domain loss; collective under expert parallelism (every rank evaluates the same batches)."""
        cfg = self.config
        return evaluate(
            self.model,
            self.data,
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            split or cfg.loop.eval_split,
            cfg.loop.eval_batches or None,
            cfg.data.layout,
            self.compute_dtype,
        )


def _has_frozen_random_base(model: torch.nn.Module) -> bool:
    """Whether some MoE layer's experts keep a frozen base FFN (which only a checkpoint can fill)."""
    for module in model.modules():
        base = getattr(module, "base_in", None)
        if callable(getattr(module, "load_base", None)) and base is not None and not base.requires_grad:
            return True
    return False


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


class _NoMetrics:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def keep_through(self, step: int) -> None:
        pass
