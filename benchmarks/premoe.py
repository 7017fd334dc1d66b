"""PreMoe's two small-scale claims (papers.md #37) on a small MoE trained here on the sample corpus's
five domains: (1) retrieval names a held-out row's domain from its first 32 tokens (> 90 % in the
paper's test); (2) a domain's mask (50 % of the experts by TCESS) hurts that domain least, less than
another domain's mask and less than a random 50 % mask.

    .venv/bin/python benchmarks/premoe.py --steps 150 --out runs/bench/premoe.json

Both TCESS readings are measured: `logit` (the released code: raw router logits) and `probability`
(moekit's default: routing probabilities).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.analysis.data import analysis_batches
from moekit.analysis.recorder import default_forward
from moekit.balance.objectives import switch_load_balancing_loss
from moekit.compress.evaluate import compare, reference
from moekit.compress.premoe import DomainMasks, build_masks
from moekit.data.batch import IGNORE_INDEX
from moekit.data.build import load_corpus
from moekit.data.splits import split_corpus
from moekit.data.tokenizer import ByteTokenizer
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.override import override_routing
from moekit.routing.spec import preset


def domain_text(folder: Path, chars: int) -> None:
    splits = split_corpus(load_corpus("sample", log=lambda _: None), seed=0)
    for domain in splits.domains:
        text = "\n\n".join(d.text for d in splits.documents("train", domain))
        (folder / f"{domain}.txt").write_text(text[:chars])


def train(model, batches, steps: int, seed: int = 0) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    order = torch.randperm(steps, generator=torch.Generator().manual_seed(seed)) % len(batches)
    loss = torch.tensor(0.0)
    for index in order.tolist():
        batch = batches[index]
        out = default_forward(model, batch)
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        real = batch.token_mask.flatten()
        for routing in out.routings:
            counts = torch.bincount(routing.kept.expert, minlength=routing.scores.shape[-1])
            aux = switch_load_balancing_loss(counts, routing.scores[real].sum(0), int(real.sum()))
            loss = loss + 0.01 * aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def retrieval(model, masks: DomainMasks, held_out, names, windows) -> dict:
    out = {}
    for window in windows:
        masks.window = window
        hits, rows = collections.Counter(), collections.Counter()
        for batch in held_out:
            for row in range(batch.input_ids.shape[0]):
                real = batch.token_mask[row]
                domain = names[int(batch.domains[row][real][0])]
                found, _ = masks.retrieve(model, batch.input_ids[row][real])
                hits[domain] += masks.domains[found] == domain
                rows[domain] += 1
        out[window] = {
            "accuracy": sum(hits.values()) / sum(rows.values()),
            "by_domain": {d: hits[d] / rows[d] for d in rows},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/premoe.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        domain_text(Path(folder), 40000)
        tokenizer = ByteTokenizer()
        data = analysis_batches(folder, tokenizer, batch_size=args.batch_size, seq_len=64, num_batches=400)
    by_domain = collections.defaultdict(list)
    for batch in data.batches:
        by_domain[int(batch.domains.max())].append(batch)
    names = data.domain_names
    fit = [b for d in sorted(by_domain) for b in by_domain[d][:20]]
    calibration = [b for d in sorted(by_domain) for b in by_domain[d][20:28]]
    held_out = [b for d in sorted(by_domain) for b in by_domain[d][28:32]]
    h = args.hidden
    moe = MoEConfig(hidden_size=h, ff_size=h, router=preset("qwen3_moe", args.experts, 2))
    config = LMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=h, num_layers=args.layers, num_heads=4, ff_size=2 * h,
        max_seq_len=64, moe=moe,
    )  # fmt: skip
    model = LanguageModel(config)
    final_loss = train(model, fit, args.steps)
    model.eval()
    trained_at = time.perf_counter()
    ref = reference(model, held_out, names)
    maps = [torch.arange(args.experts) for _ in model.moe_layers]
    results = {"train_loss": final_loss, "train_seconds": trained_at - started, "domains": list(names)}
    for score in ("probability", "logit"):
        masks, _ = build_masks(model, calibration, names, args.experts // 2, 32, score)
        row = {"retrieval": retrieval(model, masks, held_out, names, (16, 32, 64))}
        with torch.no_grad():
            row["loss_no_mask"] = compare(ref, model, held_out, names, maps)["loss_after"]
            losses = {}
            for d, name in enumerate(masks.domains):
                with override_routing(model, masks.overrides(d)):
                    losses[name] = compare(ref, model, held_out, names, maps)["loss_after"]
            g = torch.Generator().manual_seed(1)
            random = torch.zeros_like(masks.kept[0])
            for i in range(random.shape[0]):
                random[i, torch.randperm(args.experts, generator=g)[: args.experts // 2]] = True
            chance = DomainMasks(("random",), masks.keys[:1], random[None], 32)
            with override_routing(model, chance.overrides(0)):
                losses["random"] = compare(ref, model, held_out, names, maps)["loss_after"]
        row["loss_by_mask"] = losses
        row["own_mask_best"] = {
            name: min((m for m in losses if m != "random"), key=lambda m, n=name: losses[m][n]) == name
            for name in masks.domains
        }
        results[score] = row
        print(f"TCESS by {score}:")
        for window, r in row["retrieval"].items():
            shown = ", ".join(f"{d} {a:.2f}" for d, a in r["by_domain"].items())
            print(f"  retrieval from {window:2d} tokens: {r['accuracy']:.3f} ({shown})")
        print("  held-out loss (rows: mask of; columns: domain evaluated)")
        print("  " + " " * 14 + " ".join(f"{n[:8]:>8s}" for n in names))
        for mask in ["none", *masks.domains, "random"]:
            values = row["loss_no_mask"] if mask == "none" else losses[mask]
            print(f"  {mask[:14]:14s}" + " ".join(f"{values.get(n, float('nan')):8.4f}" for n in names))
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"train loss {final_loss:.3f}; {results['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
