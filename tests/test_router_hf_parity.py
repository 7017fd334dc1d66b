"""Each router preset reproduces its HF family's router module: same expert ids, same weights."""

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers as hf  # noqa: E402
from transformers.models.dbrx import modeling_dbrx  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.llama4 import modeling_llama4  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402

from moekit.routing.spec import PRESET_NAMES, preset  # noqa: E402
from moekit.routing.token_choice import TokenChoiceRouter  # noqa: E402

H = 32


def _topk_from_dense(scores, k):
    """Llama 4 returns a dense [T, E] score matrix; recover its (ids, weights)."""
    ids = torch.topk(scores, k, dim=-1).indices
    return ids, scores.gather(1, ids)


def _hf_router(name, num_experts, k):
    """(HF router module, moekit spec, fn(x) -> (ids [T,k], weights [T,k]))."""
    if name == "mixtral":
        cfg = hf.MixtralConfig(hidden_size=H, num_local_experts=num_experts, num_experts_per_tok=k)
        r = modeling_mixtral.MixtralTopKRouter(cfg)
        return r, preset("mixtral", num_experts, k), lambda x: r(x)[2:0:-1]
    if name in ("qwen2_moe", "qwen3_moe", "olmoe"):
        cls, mod = {
            "qwen2_moe": (hf.Qwen2MoeConfig, modeling_qwen2_moe.Qwen2MoeTopKRouter),
            "qwen3_moe": (hf.Qwen3MoeConfig, modeling_qwen3_moe.Qwen3MoeTopKRouter),
            "olmoe": (hf.OlmoeConfig, modeling_olmoe.OlmoeTopKRouter),
        }[name]
        norm = name == "qwen3_moe"
        cfg = cls(hidden_size=H, num_experts=num_experts, num_experts_per_tok=k, norm_topk_prob=norm)
        r = mod(cfg)
        return r, preset(name, num_experts, k), lambda x: r(x)[2:0:-1]
    if name == "deepseek_v3":
        cfg = hf.DeepseekV3Config(
            hidden_size=H,
            n_routed_experts=num_experts,
            num_experts_per_tok=k,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
        r = modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
        r.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.1)
        spec = preset("deepseek_v3", num_experts, k, num_groups=4, topk_groups=2)
        return r, spec, lambda x: r(x)[2:0:-1]
    if name == "gpt_oss":
        cfg = hf.GptOssConfig(hidden_size=H, num_local_experts=num_experts, num_experts_per_tok=k)
        r = modeling_gpt_oss.GptOssTopKRouter(cfg)
        with torch.no_grad():
            r.bias.copy_(torch.randn(num_experts) * 0.1)
        return r, preset("gpt_oss", num_experts, k), lambda x: r(x)[2:0:-1]
    if name == "llama4":
        cfg = hf.Llama4TextConfig(hidden_size=H, num_local_experts=num_experts, num_experts_per_tok=k)
        r = modeling_llama4.Llama4Router(cfg)
        return r, preset("llama4", num_experts, k), lambda x: _topk_from_dense(r(x)[0], k)
    if name == "dbrx":
        cfg = hf.DbrxConfig(
            d_model=H, ffn_config=dict(moe_num_experts=num_experts, moe_top_k=k, ffn_hidden_size=16)
        )
        ffn = modeling_dbrx.DbrxFFN(cfg)
        r = ffn.router
        return r, preset("dbrx", num_experts, k), lambda x: ffn.route_tokens_to_experts(r(x))[::-1]
    if name == "granitemoe":
        from transformers.models.granitemoe import modeling_granitemoe

        cfg = hf.GraniteMoeConfig(hidden_size=H, num_local_experts=num_experts, num_experts_per_tok=k)
        r = modeling_granitemoe.GraniteMoeTopKRouter(cfg)
        return r, preset("granitemoe", num_experts, k), lambda x: r(x)[2:0:-1]
    raise AssertionError(name)


def _copy_router_weights(hf_router, ours, name):
    with torch.no_grad():
        if name == "dbrx":
            ours.weight.copy_(hf_router.layer.weight)
        else:
            ours.weight.copy_(hf_router.weight)
        if name == "gpt_oss":
            ours.bias.copy_(hf_router.bias)
        if name == "deepseek_v3":
            ours.selection_bias.copy_(hf_router.e_score_correction_bias)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_matches_hf_router(name):
    num_experts, k = 16, 4
    hf_router, spec, run_hf = _hf_router(name, num_experts, k)
    with torch.no_grad():
        for p in hf_router.parameters():
            p.normal_(0, 0.3)
    hf_router.eval()
    ours = TokenChoiceRouter(H, spec)
    _copy_router_weights(hf_router, ours, name)
    x = torch.randn(64, H)
    with torch.no_grad():
        hf_ids, hf_weights = run_hf(x.clone())
        routing = ours(x)
    # moekit records assignments grouped by expert; rebuild the [T, k] view per token.
    ids = torch.full((64, k), -1)
    weights = torch.zeros(64, k)
    ids[routing.kept.token, routing.kept.rank] = routing.kept.expert
    weights[routing.kept.token, routing.kept.rank] = routing.kept.weight
    hf_sorted, order = hf_ids.sort(dim=1)
    ours_sorted, our_order = ids.sort(dim=1)
    assert torch.equal(hf_sorted, ours_sorted), f"{name}: different experts chosen"
    torch.testing.assert_close(
        weights.gather(1, our_order), hf_weights.float().gather(1, order), rtol=1e-6, atol=1e-7
    )
