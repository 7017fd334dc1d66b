"""The routing recorder and trace: outputs unchanged, tokens aligned, save/load round trip."""

import json

import pytest
import torch
from torch import nn

from moekit.analysis.recorder import RoutingRecorder, find_moe_layers, record_routing
from moekit.analysis.trace import RoutingTrace, load_trace, routing_slots
from moekit.errors import MoekitError
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.factory import ROUTER_KINDS
from moekit.routing.record import Assignments, Routing
from moekit.routing.spec import preset


def tiny_lm(capacity_factor=1.0) -> LanguageModel:
    router = preset("qwen3_moe", 8, 2).with_(capacity_factor=capacity_factor)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=router, num_shared_experts=1)
    config = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, ff_size=48, max_seq_len=24, moe=moe
    )
    return LanguageModel(config)


def batch(rows=3, cols=24, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    token_mask = torch.ones(rows, cols, dtype=torch.bool)
    token_mask[1, 17:] = False  # a padded row
    doc_ids = torch.zeros(rows, cols, dtype=torch.long)
    doc_ids[0, 10:] = 1  # a packed row: two documents
    doc_ids[1] = 2
    doc_ids[2] = 3
    doc_ids[~token_mask] = -1
    positions = torch.arange(cols).expand(rows, cols).clone()
    positions[0, 10:] -= 10
    return dict(
        input_ids=torch.randint(0, 64, (rows, cols), generator=generator),
        token_mask=token_mask,
        doc_ids=doc_ids,
        positions=positions,
        domains=torch.tensor([[0], [1], [2]]).expand(rows, cols).clone(),
    )


def forward(model, b):
    return model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"], token_mask=b["token_mask"])


def test_outputs_are_bit_identical_with_and_without_recording():
    model = tiny_lm().eval()
    b = batch()
    plain = forward(model, b).logits
    with RoutingRecorder(model, scores=True, expert_activations=True) as recorder, recorder.batch(b):
        recorded = forward(model, b).logits
    assert torch.equal(plain, recorded)
    assert recorder.num_batches == 1


def test_training_step_is_bit_identical_with_recording():
    b = batch()
    results = []
    for record in (False, True):
        torch.manual_seed(0)
        model = tiny_lm()
        recorder = RoutingRecorder(model, scores=True, expert_activations=True)
        with recorder:
            if record:
                with recorder.batch(b):
                    loss = forward(model, b).logits.square().mean()
            else:
                loss = forward(model, b).logits.square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_trace_is_aligned_with_the_routing_and_the_batch():
    model = tiny_lm(capacity_factor=0.75).eval()  # tight capacity: some assignments are dropped
    b = batch()
    with torch.no_grad():
        routings = forward(model, b).routings
    trace = record_routing(model, [b], forward=forward, domain_names=("x", "y", "z"))
    mask = b["token_mask"].reshape(-1)
    assert trace.num_tokens == int(mask.sum())
    assert torch.equal(trace.token_ids, b["input_ids"].reshape(-1)[mask])
    assert torch.equal(trace.positions, b["positions"].reshape(-1)[mask])
    assert torch.equal(trace.domains, b["domains"].reshape(-1)[mask])
    assert torch.equal(trace.sequences, torch.arange(3).repeat_interleave(24)[mask])
    assert trace.layer_names == [name for name, _ in find_moe_layers(model)]
    for layer, routing in zip(trace.layers, routings, strict=True):
        assert torch.equal(layer.top1, routing.top1_expert()[mask])
        assert int(layer.dropped.sum()) == len(routing.dropped) > 0
        assert torch.equal(layer.load(), routing.counts[: layer.num_compute_experts])
        expected_entropy = torch.special.entr(routing.scores[mask].double()).sum(-1).float()
        assert torch.allclose(layer.entropy, expected_entropy, atol=1e-6)
    # doc ids stay unique across batches; a second batch continues the sequence numbering
    trace2 = record_routing(model, [b, batch(seed=1)], forward=forward)
    assert trace2.num_tokens == 2 * trace.num_tokens
    first, second = trace2.doc_ids[: trace.num_tokens], trace2.doc_ids[trace.num_tokens :]
    assert int(second.min()) > int(first.max())
    assert int(trace2.sequences.max()) == 5


def test_routing_slots_order_expert_choice_assignments_by_weight():
    # rank is each expert's order of its tokens: token 0 is both experts' best (rank 0 twice)
    kept = Assignments(
        token=torch.tensor([0, 1, 0, 2]),
        expert=torch.tensor([0, 0, 1, 1]),
        weight=torch.tensor([0.2, 0.1, 0.7, 0.3]),
        rank=torch.tensor([0, 1, 0, 1]),
    )
    routing = Routing(
        logits=torch.zeros(3, 2),
        scores=torch.full((3, 2), 0.5),
        kept=kept,
        dropped=Assignments.empty(),
        token_mask=torch.ones(3, dtype=torch.bool),
        num_compute_experts=2,
    )
    experts, weights, _ = routing_slots(routing)
    assert experts.tolist() == [[1, 0], [0, -1], [1, -1]]
    assert torch.equal(weights, torch.tensor([[0.7, 0.2], [0.1, 0.0], [0.3, 0.0]]))


def test_routing_slots_handles_variable_k_and_drops():
    # token 0 chose 3 experts (one dropped), token 1 chose one, token 2 none
    kept = Assignments(
        token=torch.tensor([1, 0, 0]),
        expert=torch.tensor([0, 2, 5]),
        weight=torch.tensor([1.0, 0.5, 0.2]),
        rank=torch.tensor([0, 0, 2]),
    )
    dropped = Assignments(
        token=torch.tensor([0]), expert=torch.tensor([4]), weight=torch.tensor([0.3]), rank=torch.tensor([1])
    )
    routing = Routing(
        logits=torch.zeros(3, 6),
        scores=torch.full((3, 6), 1 / 6),
        kept=kept,
        dropped=dropped,
        token_mask=torch.ones(3, dtype=torch.bool),
        num_compute_experts=6,
    )
    experts, weights, flags = routing_slots(routing)
    assert experts.tolist() == [[2, 4, 5], [0, -1, -1], [-1, -1, -1]]
    assert torch.equal(weights, torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert flags.tolist() == [[False, True, False], [False, False, False], [False, False, False]]


class TwoMoEs(nn.Module):
    """Not a LanguageModel: just something with MoE layers inside, called as modules."""

    def __init__(self):
        super().__init__()
        config = MoEConfig(hidden_size=16, ff_size=8, router=preset("mixtral", 4, 2))
        self.embed = nn.Embedding(20, 16)
        self.stack = nn.ModuleList([MoE(config), MoE(config)])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for moe in self.stack:
            x = x + moe(x)
        return x


def test_any_module_with_moe_layers_and_expert_peaks_match_a_direct_computation():
    model = TwoMoEs().eval()
    ids = torch.randint(0, 20, (2, 7))
    trace = record_routing(model, [{"input_ids": ids}], expert_activations=True)
    assert trace.layer_names == ["stack.0", "stack.1"]
    assert trace.num_tokens == 14 and (trace.domains == -1).all()
    # the first layer's input is the embedding: recompute each expert's peak output by hand
    x = model.embed(ids).reshape(-1, 16).detach()
    layer = trace.layers[0]
    moe = model.stack[0]
    expected = torch.zeros(4)
    for token in range(14):
        for expert in layer.experts[token].tolist():
            out = moe.experts.expert_forward(expert, x[token : token + 1]).abs().max()
            expected[expert] = max(expected[expert], out)
    assert torch.allclose(layer.activation_max, expected)
    for expert in range(4):
        token = int(layer.activation_token[expert])
        assert expert in layer.experts[token].tolist()


def test_layer_calls_outside_a_batch_are_ignored_and_the_recorder_detaches():
    model = TwoMoEs()
    ids = torch.randint(0, 20, (1, 5))
    with RoutingRecorder(model) as recorder:
        model(ids)  # e.g. a training step that is not recorded
        with recorder.batch(input_ids=ids):
            model(ids)
    assert recorder.trace().num_tokens == 5
    assert all("forward_with_routing" not in vars(moe) for moe in model.stack)


def test_recorder_errors_are_clear():
    model = TwoMoEs()
    ids = torch.randint(0, 20, (2, 5))
    with RoutingRecorder(model) as recorder:
        too_small = recorder.batch(input_ids=ids[:1])
        with (
            pytest.raises(MoekitError, match="routed 10 tokens during a batch of shape \\[1, 5\\]"),
            too_small,
        ):
            model(ids)
        with pytest.raises(MoekitError, match="routed 0 tokens"), recorder.batch(input_ids=ids):
            pass  # the model was never called
        bad_mask = torch.ones(3, dtype=torch.bool)
        with (
            pytest.raises(MoekitError, match="token_mask has shape"),
            recorder.batch(input_ids=ids, token_mask=bad_mask),
        ):
            pass
        with pytest.raises(MoekitError, match="no batch was recorded"):
            recorder.trace()
    with pytest.raises(MoekitError, match="no moekit MoE layers"):
        RoutingRecorder(nn.Linear(3, 3))


def test_trace_save_load_round_trip(tmp_path):
    model = tiny_lm().eval()
    trace = record_routing(
        model,
        [batch(), batch(seed=2)],
        forward=forward,
        scores=True,
        expert_activations=True,
        domain_names=("x", "y", "z"),
        meta={"source": "test"},
    )
    trace.save(tmp_path / "trace")
    loaded = load_trace(tmp_path / "trace")
    assert loaded.domain_names == ("x", "y", "z") and loaded.meta == {"source": "test"}
    for name in ("token_ids", "positions", "columns", "sequences", "doc_ids", "domains"):
        assert torch.equal(getattr(loaded, name), getattr(trace, name))
    for a, b in zip(trace.layers, loaded.layers, strict=True):
        for name in ("experts", "weights", "dropped", "scores", "activation_max", "activation_token"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(a.entropy, b.entropy)
        assert torch.equal(a.margin.isnan(), b.margin.isnan())
        assert (a.name, a.num_experts, a.num_compute_experts) == (
            b.name,
            b.num_experts,
            b.num_compute_experts,
        )


def test_damaged_traces_give_clear_errors(tmp_path):
    model = TwoMoEs()
    trace = record_routing(model, [{"input_ids": torch.randint(0, 20, (1, 6))}])
    trace.save(tmp_path)
    index = json.loads((tmp_path / "trace.json").read_text())
    index["num_tokens"] = 7
    (tmp_path / "trace.json").write_text(json.dumps(index))
    with pytest.raises(MoekitError, match="trace.json: num_tokens is 7"):
        load_trace(tmp_path)
    index["layers"][0]["has_scores"] = True
    index["num_tokens"] = 6
    (tmp_path / "trace.json").write_text(json.dumps(index))
    with pytest.raises(MoekitError, match="trace.safetensors: missing tensor 'layers.0.scores'"):
        load_trace(tmp_path)
    (tmp_path / "trace.json").write_text('{"format": "something else"}')
    with pytest.raises(MoekitError, match="not a routing trace"):
        load_trace(tmp_path)
    with pytest.raises(MoekitError, match="not found"):
        load_trace(tmp_path / "missing")
    with pytest.raises(MoekitError, match="positions has shape"):
        RoutingTrace(
            token_ids=torch.zeros(3, dtype=torch.long),
            positions=torch.zeros(2, dtype=torch.long),
            columns=torch.zeros(3, dtype=torch.long),
            sequences=torch.zeros(3, dtype=torch.long),
            doc_ids=torch.zeros(3, dtype=torch.long),
            domains=torch.zeros(3, dtype=torch.long),
            layers=[],
        )


ROUTER_OPTIONS = {
    "null_experts": {"num_null": 2},
    "dynamic_capacity": {"p": 0.5, "num_null": 2},
    "top_p": {"p": 0.6},
}


@pytest.mark.parametrize("kind", [k for k in ROUTER_KINDS if k != "hash"])
def test_every_router_kind_is_recorded_without_changing_outputs(kind):
    top_k = 1 if kind == "stochastic" else 2
    moe = MoEConfig(
        hidden_size=32,
        ff_size=16,
        router=preset("qwen2_moe", 8, top_k),
        router_kind=kind,
        router_options=ROUTER_OPTIONS.get(kind, {}),
        num_shared_experts=1,
    )
    config = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ff_size=48, max_seq_len=16, moe=moe
    )
    model = LanguageModel(config).eval()
    ids = torch.randint(0, 64, (3, 16))
    torch.manual_seed(1)
    plain = model(ids)
    torch.manual_seed(1)  # stochastic routers draw the same samples
    with (
        RoutingRecorder(model, scores=True, expert_activations=True) as recorder,
        recorder.batch(input_ids=ids),
    ):
        recorded = model(ids)
    assert torch.equal(plain.logits, recorded.logits)
    trace = recorder.trace()
    for layer, routing in zip(trace.layers, recorded.routings, strict=True):
        assert layer.num_experts == routing.num_experts  # null experts included
        chosen = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.long)
        for part in (routing.kept, routing.dropped):
            chosen.index_put_((part.token, part.expert), torch.ones_like(part.token), accumulate=True)
        recorded_counts = torch.zeros_like(chosen)
        rows = torch.arange(layer.num_tokens).unsqueeze(1).expand_as(layer.experts)
        real = layer.experts >= 0
        recorded_counts.index_put_(
            (rows[real], layer.experts[real]), torch.ones_like(rows[real]), accumulate=True
        )
        assert torch.equal(recorded_counts, chosen)  # a chain router may pick an expert twice
        if kind != "expert_choice":  # there, rank is the token's place in the expert's order
            assert torch.equal(layer.top1, routing.top1_expert())


class HashRouted(nn.Module):
    """Hash routing (Roller et al. 2021) sends a token id to the same experts in every context."""

    def __init__(self):
        super().__init__()
        config = MoEConfig(
            hidden_size=16,
            ff_size=8,
            router=preset("qwen2_moe", 8, 2),
            router_kind="hash",
            router_options={"vocab_size": 40},
        )
        self.embed = nn.Embedding(40, 16)
        self.moe = MoE(config)

    def forward(self, input_ids):
        return self.moe(self.embed(input_ids), token_ids=input_ids)


def test_token_id_purity_of_hash_routing_is_one():
    from moekit.analysis.health import routing_health

    ids = torch.randint(0, 40, (4, 32))
    trace = record_routing(HashRouted(), [{"input_ids": ids}])
    purity = routing_health(trace)["layers"][0]["purity"]
    assert purity["token_id_purity"] == 1.0
    assert purity["token_id_purity_shuffled"] < 0.9
