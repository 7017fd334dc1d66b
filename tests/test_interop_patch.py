"""`moekit.patch`: a live transformers model on moekit layers, same parameters, same results.

Against an unpatched copy: logits, loss, HF's aux loss and every parameter gradient match on a
padded batch; the moekit layers hold the model's own parameter objects and the state dict is
unchanged; the routing records pick HF's experts; unpatching restores the original blocks.
"""

import copy

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402

from moekit.errors import MoekitError  # noqa: E402
from moekit.interop.patch import PatchedMoE, patch  # noqa: E402
from moekit.interop.tiny import tiny_model  # noqa: E402

PATCHABLE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe"]
ATOL = 1e-5


def _batch(seq=12):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _pair(family):
    reference = tiny_model(family, seed=2).train()
    patched = copy.deepcopy(reference)
    return reference, patched


def _run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", PATCHABLE)
def test_patched_model_matches_logits_loss_and_gradients(family):
    reference, model = _pair(family)
    handle = patch(model)
    ids, mask, labels = _batch()
    expected, got = _run(reference, ids, mask, labels), _run(model, ids, mask, labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    if expected.aux_loss is not None:  # HF's own balancing loss still sees the router logits
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=ATOL, rtol=0)
    named = dict(model.named_parameters())
    assert named.keys() == dict(reference.named_parameters()).keys()
    for name, p in reference.named_parameters():
        assert named[name].grad is not None, name
        torch.testing.assert_close(named[name].grad, p.grad, atol=ATOL, rtol=1e-4, msg=name)
    assert len(handle.routings) == len(handle.blocks) > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_patch_shares_parameters_and_keeps_the_state_dict(family, tmp_path):
    reference, model = _pair(family)
    keys = list(model.state_dict())
    handle = patch(model)
    assert list(model.state_dict()) == keys
    for block in handle.blocks:
        assert isinstance(block, PatchedMoE)
        assert block.moe.router.weight is block.gate.weight
        assert block.moe.experts.w_in is block.experts.gate_up_proj
        assert block.moe.experts.w_out is block.experts.down_proj
    if family == "deepseek_v3":
        layer, gate = handle.moe_layers[0], handle.blocks[0].gate
        before = gate.e_score_correction_bias.clone()
        with torch.no_grad():  # a moekit bias update lands in transformers' buffer
            layer.router.selection_bias.add_(0.5)
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))  # rebinding keeps the shared buffer
        torch.testing.assert_close(gate.e_score_correction_bias, before + 0.5)
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(before)
    # save_pretrained of the patched model writes the unpatched model's checkpoint
    model.save_pretrained(tmp_path / "patched")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_routing_records_pick_hf_experts_and_skip_padding(family):
    reference, model = _pair(family)
    reference.eval(), model.eval()
    handle = patch(model)
    ids, mask, _ = _batch()
    chosen = []
    experts = [m for m in reference.modules() if type(m).__name__.endswith("Experts")]
    hooks = [m.register_forward_pre_hook(lambda _m, args: chosen.append(args[1])) for m in experts]
    with torch.no_grad():
        reference(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.bool().reshape(-1)
    for routing, hf_ids in zip(handle.routings, chosen, strict=True):
        assert torch.equal(routing.token_mask, real)
        ours = torch.full_like(hf_ids, -1)
        ours[routing.kept.token, routing.kept.rank] = routing.kept.expert
        assert torch.equal(ours[real].sort(1).values, hf_ids[real].sort(1).values)
        assert bool((ours[~real] == -1).all())


def test_padding_is_computed_as_transformers_does_and_recorded_on_request():
    reference, model = _pair("qwen3_moe")
    reference.eval(), model.eval()
    handle = patch(model, record_padding=True)
    ids, mask, _ = _batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)  # padded positions included
    for routing in handle.routings:
        assert bool(routing.token_mask.all()) and len(routing.kept) == routing.num_tokens * 2


def test_gradient_checkpointing_recomputes_the_same_routing():
    reference, model = _pair("mixtral")
    for m in (reference, model):
        m.activation_checkpointing_enable()
    patch(model)
    ids, mask, labels = _batch()
    _run(reference, ids, mask, labels), _run(model, ids, mask, labels)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_unpatch_restores_the_original_blocks():
    reference, model = _pair("olmoe")
    classes = [type(m).__name__ for m in model.modules()]
    with patch(model) as handle:
        assert handle.active and any(isinstance(m, PatchedMoE) for m in model.modules())
    assert not handle.active
    assert [type(m).__name__ for m in model.modules()] == classes
    ids, mask, _ = _batch()
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
        )


def test_patching_twice_and_routings_before_a_forward_are_errors():
    _, model = _pair("qwen3_moe")
    handle = patch(model)
    with pytest.raises(MoekitError, match="no routing recorded yet"):
        _ = handle.routings
    with pytest.raises(MoekitError, match="already patched"):
        patch(model)


@pytest.mark.parametrize("family", ["gpt_oss", "dbrx", "llama4_text"])
def test_families_with_other_expert_layouts_refuse_with_a_reason(family):
    model = tiny_model(family)
    with pytest.raises(MoekitError, match="not patchable.*from_hf.*Patchable families: mixtral"):
        patch(model)


def test_unsupported_architecture_lists_the_supported_ones():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(
        MoekitError, match=r"'llama' is not a supported MoE family; supported: mixtral \(Mixtral"
    ):
        patch(model)
