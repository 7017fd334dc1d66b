"""PreMoe: per-domain expert masks from TCESS, and retrieval of a prompt's domain at inference."""

import collections
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moekit.analysis.data import analysis_batches
from moekit.analysis.recorder import default_forward
from moekit.balance.objectives import switch_load_balancing_loss
from moekit.compress.premoe import (
    DomainMasks,
    build_masks,
    compress_premoe,
    domain_scores,
    load_masks,
    tcess,
)
from moekit.data.batch import IGNORE_INDEX
from moekit.data.tokenizer import ByteTokenizer
from moekit.errors import ConfigError
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.override import Overrides, RoutingCapture, override_routing
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint
from test_compress import CONFIGS, random_batches, run, small_recipe

DOMAINS = ("code", "math", "multilingual")  # three of the sample corpus's domains (papers.md's test)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_on_domains(tmp_path_factory.mktemp("premoe"))


def balance_loss(routings, real):
    """Switch load balancing over the MoE layers (keeps the small model's routing from collapsing)."""
    total = 0.0
    for routing in routings:
        counts = torch.bincount(routing.kept.expert, minlength=routing.scores.shape[-1])
        total = total + switch_load_balancing_loss(counts, routing.scores[real].sum(0), int(real.sum()))
    return total


def train_on_domains(root, steps=60):
    """A small LM trained briefly on three domains' text, its calibration and held-out batches
    (each batch one domain), and the text folder they came from."""
    from moekit.data.build import load_corpus
    from moekit.data.splits import split_corpus

    splits = split_corpus(load_corpus("sample", log=lambda _: None), seed=0)
    text = root / "text"
    text.mkdir()
    for domain in DOMAINS:
        (text / f"{domain}.txt").write_text(
            "\n\n".join(d.text for d in splits.documents("train", domain))[:12000]
        )
    tokenizer = ByteTokenizer()
    data = analysis_batches(text, tokenizer, batch_size=4, seq_len=64, num_batches=60)
    by_domain = collections.defaultdict(list)
    for batch in data.batches:
        by_domain[int(batch.domains.max())].append(batch)
    calibration = [b for d in sorted(by_domain) for b in by_domain[d][:6]]
    held_out = [b for d in sorted(by_domain) for b in by_domain[d][6:10]]
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ff_size=32, router=preset("qwen3_moe", 8, 2))
    config = LMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, ff_size=64,
        max_seq_len=96, moe=moe,
    )  # fmt: skip
    model = LanguageModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.randperm(steps, generator=torch.Generator().manual_seed(0)) % len(calibration)
    for step in order.tolist():
        batch = calibration[step]
        out = default_forward(model, batch)
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        loss = loss + 0.01 * balance_loss(out.routings, batch.token_mask.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    state = {"config": {"model": config.to_dict(), "data": {"tokenizer": "byte"}}, "step": steps}
    save_checkpoint(root / "run" / "checkpoints" / f"step-{steps}", model, None, state)
    return SimpleNamespace(
        model=model, calibration=calibration, held_out=held_out, names=data.domain_names, text=text, root=root
    )


def test_tcess_is_the_released_formula():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [1.5, -2.0, 1.0]])
    top1 = logits.argmax(-1)
    # each token adds its top-1 logit to its top-1 expert, nothing elsewhere
    assert tcess(logits, top1).tolist() == [2.0 + 1.5, 3.0, 0.0]
    # the first choice is the router's, not the largest logit (e.g. after a selection bias)
    assert tcess(logits, torch.tensor([1, 1, 2])).tolist() == [0.0, 1.0 + 3.0, 1.0]


def test_retrieval_names_each_held_out_domain_on_a_trained_model(trained):
    masks, sums = build_masks(trained.model, trained.calibration, trained.names, keep=4, window=32)
    assert masks.domains == trained.names and masks.kept.sum(-1).eq(4).all()
    assert len({tuple(m.flatten().tolist()) for m in masks.kept}) > 1  # domains keep different experts
    hits, rows = collections.Counter(), collections.Counter()
    for batch in trained.held_out:
        for row in range(batch.input_ids.shape[0]):
            real = batch.token_mask[row]
            domain = int(batch.domains[row][real][0])
            found, distances = masks.retrieve(trained.model, batch.input_ids[row][real])
            assert distances.shape == (len(trained.names),)
            hits[domain] += found == domain
            rows[domain] += 1
    accuracy = {trained.names[d]: hits[d] / rows[d] for d in rows}
    assert len(accuracy) == 3 and all(a >= 0.75 for a in accuracy.values()), accuracy  # chance: 1/3


def test_a_domain_mask_changes_routing_and_only_uses_its_experts(trained):
    masks, _ = build_masks(trained.model, trained.calibration, trained.names, keep=4, window=32)
    ids = trained.held_out[0].input_ids
    plain, masked = RoutingCapture(), RoutingCapture()
    with torch.no_grad():
        with override_routing(trained.model, Overrides(capture=plain)):
            base = trained.model(ids).logits
        with override_routing(trained.model, masks.overrides(0, masked)):
            steered = trained.model(ids).logits
    assert not torch.allclose(base, steered)
    for layer in range(2):
        allowed = masks.kept[0, layer]
        chosen_plain = plain.routings[layer][0].kept.expert
        chosen_masked = masked.routings[layer][0].kept.expert
        assert bool(allowed[chosen_masked].all())  # only the domain's experts
        assert not bool(allowed[chosen_plain].all())  # unmasked, other experts were chosen


def test_masks_round_trip_and_bad_files_are_one_error(tmp_path, trained):
    masks, _ = build_masks(trained.model, trained.calibration, trained.names, keep=4, window=16)
    masks.save(tmp_path)
    loaded = DomainMasks.load(tmp_path)
    assert loaded.domains == masks.domains and loaded.window == 16
    assert torch.equal(loaded.kept, masks.kept) and torch.equal(loaded.keys, masks.keys)
    from moekit.errors import MoekitError

    with pytest.raises(MoekitError, match="no PreMoe masks"):
        load_masks(tmp_path / "a" / "b" / "c")  # looks in the folder and the two above it
    (tmp_path / "premoe.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MoekitError, match="not usable PreMoe masks"):
        DomainMasks.load(tmp_path)


def test_one_domain_is_refused(trained):
    one = [b for b in trained.calibration if int(b.domains.max()) == 0]
    with pytest.raises(ConfigError, match="at least two domains"):
        build_masks(trained.model, one, trained.names, keep=4, window=32)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_premoe_on_hf_families_prunes_to_the_union_and_masks_in_its_numbering(family, tmp_path):
    tiny = pytest.importorskip("moekit.interop.tiny")
    from moekit.interop.hf import from_hf

    overrides = dict(n_group=2, topk_group=1, num_hidden_layers=3) if family == "deepseek_v3" else {}
    tiny.tiny_model(family, **overrides).save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    batches = []
    for i, raw in enumerate(random_batches(n=4)):  # two "domains": random tokens, and one repeated token
        ids = raw["input_ids"] if i % 2 == 0 else torch.full_like(raw["input_ids"], 7)
        batches.append(SimpleNamespace(input_ids=ids, domains=torch.full_like(ids, i % 2)))
    num = model.moe_layers[0].config.router.num_experts
    compressed, positions, masks, details = compress_premoe(model, batches, ("low", "high"), num // 2, 24)
    union = details["premoe"]["union"]
    assert all(len(layout) == compressed.moe_layers[0].experts.num_experts for layout in positions)
    for i, layout in enumerate(positions):
        assert set(union[i]) <= set(layout)
        for d, name in enumerate(("low", "high")):
            kept_here = {layout[p] for p in torch.nonzero(masks.kept[d, i]).flatten().tolist()}
            assert kept_here == set(details["premoe"]["kept"][name][i])
    # each domain's rows retrieve their own domain on the compressed model
    for batch in batches:
        found, _ = masks.retrieve(compressed, batch.input_ids[0])
        assert masks.domains[found] == ("low", "high")[int(batch.domains[0, 0])]
    sums, _ = domain_scores(compressed, batches, 2)
    assert sums.shape[-1] == masks.kept.shape[-1]


def test_cli_compress_generate_and_eval_tasks_use_the_masks(trained, tmp_path, capsys):
    import yaml

    from moekit.cli import main

    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "premoe.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["calibration"] = {"batches": 9, "batch_size": 4, "seq_len": 64}
    data["evaluation"] = {"batches": 6}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert run(trained.root / "run", "--recipe", recipe, "--calib", trained.text, "--out", out) == 0
    assert "premoe: masks of 3 domains" in capsys.readouterr().out
    report = json.loads((out / "compress_report.json").read_text())
    premoe = report["premoe"]
    assert premoe["domains"] == list(DOMAINS) and premoe["retrieval"]["rows"] > 0
    assert set(premoe["loss_by_mask"]) == set(DOMAINS)
    assert (out / "premoe.safetensors").is_file() and (out / "premoe.json").is_file()
    code = (trained.text / "code.txt").read_text()[-60:]
    result = tmp_path / "g.json"
    argv = [
        "generate",
        str(out),
        "--prompt",
        code,
        "--max-new-tokens",
        "3",
        "--premoe",
        "--json",
        str(result),
    ]
    assert main(argv) == 0
    generated = json.loads(result.read_text())
    assert generated["premoe"]["domain"] in DOMAINS and set(generated["premoe"]["distances"]) == set(DOMAINS)
    assert "premoe: the prompt's domain" in capsys.readouterr().err
    tasks = tmp_path / "t.json"
    assert (
        main(
            [
                "eval-tasks",
                str(out),
                "--method",
                "premoe",
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--json",
                str(tasks),
            ]
        )
        == 0
    )
    items = json.loads(tasks.read_text())["items"]
    assert all(item["domain"] in DOMAINS for item in items)
    # without stored masks: one line, exit 2
    capsys.readouterr()
    assert main(["generate", str(trained.root / "run"), "--prompt", "x", "--premoe"]) == 2
    err = capsys.readouterr().err
    assert "no PreMoe masks" in err and err.count("\n") == 1
