"""merge_state_dicts against float64 references written from the papers, properties, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.errors import ConfigError
from moekit.merging import merge_state_dicts, tensor_seed
from moekit.merging import methods as m


def _models(n: int, shape=(6, 10), seed: int = 0, dtype=torch.float64, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(shape, generator=g, dtype=dtype),
        "b": torch.randn(shape[-1], generator=g, dtype=dtype),
    }
    finetuned = [
        {k: v + scale * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, finetuned


# ---- float64 references, written element by element from the papers ----


def _ref_ties(base: np.ndarray, fts: list[np.ndarray], weights, density: float, lam: float) -> np.ndarray:
    taus = [ft.reshape(-1) - base.reshape(-1) for ft in fts]
    d = taus[0].size
    k = max(1, int(density * d))
    trimmed = []
    for tau in taus:
        keep = np.zeros(d, bool)
        if density >= 1:
            keep[:] = True
        else:
            keep[np.argsort(-np.abs(tau), kind="stable")[:k]] = True
        trimmed.append(np.where(keep, tau, 0.0))
    out = np.zeros(d)
    for j in range(d):
        total = sum(w * t[j] for w, t in zip(weights, trimmed, strict=True))
        elected = 1.0 if total >= 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, trimmed, strict=True):
            if np.sign(w * t[j]) == elected:
                num += w * t[j]
                den += w
        out[j] = num / den if den != 0 else 0.0
    return (base.reshape(-1) + lam * out).reshape(base.shape)


def _ref_pcb(base: np.ndarray, fts: list[np.ndarray], weights, ratio: float, lam: float) -> np.ndarray:
    """The authors' PCB_merge on one tensor (rows = tasks), transcribed with numpy."""
    taus = np.stack([ft.reshape(-1) - base.reshape(-1) for ft in fts])
    n, d = taus.shape

    def norm(x):
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return (x - lo) / (hi - lo)

    def clamp(x, lo_r, hi_r):
        s = np.sort(x, 1)
        return np.clip(x, s[:, [int(d * lo_r)]], s[:, [int(d * (1 - hi_r) - 1)]])

    mags = clamp(np.abs(taus), 1e-4, 1e-4)
    clamped = np.sign(taus) * mags
    score = np.exp(n * norm(mags) ** 2) * np.tanh(taus * taus.sum(0, keepdims=True))
    scale = norm(clamp(score, 1 - ratio, 0))
    w = np.asarray(weights)[:, None]
    merged = (clamped * scale * w).sum(0) / np.maximum(scale.sum(0), 1e-12)
    return (base.reshape(-1) + lam * merged).reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_float64_reference(density):
    base, fts = _models(3, seed=1)
    weights, lam = [1.0, 0.5, 2.0], 0.8
    merged = merge_state_dicts(base, fts, "ties", density=density, weights=weights, lam=lam)
    for name in base:
        expected = _ref_ties(base[name].numpy(), [f[name].numpy() for f in fts], weights, density, lam)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_pcb_matches_the_authors_code_in_float64(ratio):
    base, fts = _models(4, shape=(8, 25), seed=2)
    weights, lam = [1.2, 1.0, 0.9, 1.1], 1.0
    merged = merge_state_dicts(base, fts, "pcb", ratio=ratio, weights=weights, lam=lam)
    for name in base:
        expected = _ref_pcb(base[name].numpy(), [f[name].numpy() for f in fts], weights, ratio, lam)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=0, atol=1e-12)


def test_task_arithmetic_matches_float64_reference():
    base, fts = _models(3, seed=3)
    merged = merge_state_dicts(base, fts, "ta", weights=[0.3, 0.3, 0.4], lam=1.5)
    for name in base:
        expected = base[name] + 1.5 * sum(
            w * (f[name] - base[name]) for w, f in zip([0.3, 0.3, 0.4], fts, strict=True)
        )
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-12)


def test_float32_inputs_agree_with_the_float64_merge():
    base, fts = _models(3, seed=4)
    as32 = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    for method, params in [
        ("ta", {}),
        ("ties", {"density": 0.3}),
        ("pcb", {"ratio": 0.2}),
        ("dare_ties", {}),
    ]:
        high = merge_state_dicts(base, fts, method, **params)
        low = merge_state_dicts(as32(base), [as32(f) for f in fts], method, **params)
        for name in base:
            assert low[name].dtype == torch.float32
            torch.testing.assert_close(low[name].double(), high[name], rtol=1e-5, atol=1e-5)


# ---- DARE ----


def test_dare_drops_at_rate_p_and_rescales_the_rest():
    base, fts = _models(1, shape=(200, 100), seed=5)
    p = 0.7
    merged = merge_state_dicts(base, fts, "dare_ta", drop_rate=p, seed=3)
    tau = fts[0]["w"] - base["w"]
    out = merged["w"] - base["w"]
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 20000 draws: sd ~ 0.003
    torch.testing.assert_close(out[kept], tau[kept] / (1 - p), rtol=1e-12, atol=1e-12)


def test_dare_masks_follow_the_seed_and_the_tensor_name():
    base, fts = _models(2, seed=6)
    a = merge_state_dicts(base, fts, "dare_ties", drop_rate=0.5, seed=1)
    b = merge_state_dicts(base, fts, "dare_ties", drop_rate=0.5, seed=1)
    c = merge_state_dicts(base, fts, "dare_ties", drop_rate=0.5, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], c["w"])
    # a tensor's mask does not depend on the other tensors being merged
    alone = merge_state_dicts(
        {"w": base["w"]}, [{"w": f["w"]} for f in fts], "dare_ties", drop_rate=0.5, seed=1
    )
    assert torch.equal(alone["w"], a["w"])
    # and it is the mask a generator seeded with tensor_seed draws, keep ~ Bernoulli(1 - p)
    g = torch.Generator().manual_seed(tensor_seed(1, "w"))
    keeps = [torch.bernoulli(torch.full((6, 10), 0.5), generator=g) for _ in fts]
    dropped = torch.stack([(f["w"] - base["w"]) * k / 0.5 for f, k in zip(fts, keeps, strict=True)]).reshape(
        2, 1, -1
    )
    expected = base["w"] + m.disjoint_mean(
        dropped, torch.ones(2, dtype=torch.float64), m.elect_sign(dropped)
    ).reshape(6, 10)
    torch.testing.assert_close(a["w"], expected, rtol=0, atol=1e-12)


# ---- properties ----

_finite = st.floats(-2, 2, allow_nan=False, width=64)


_ANY_COUNT = st.integers(1, 4)


@st.composite
def _state(draw, n_models=_ANY_COUNT):
    n = draw(n_models)
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    return (*_models(n, shape=(rows, cols), seed=seed), seed)


@settings(max_examples=30, deadline=None)
@given(_state(n_models=st.just(1)))
def test_ta_with_one_model_and_lambda_1_returns_the_finetuned_model(state):
    base, fts, _ = state
    merged = merge_state_dicts(base, fts, "ta", lam=1.0)
    for name in base:
        torch.testing.assert_close(merged[name], fts[0][name], rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(0, 2**16), st.sampled_from([1.0, -1.0]))
def test_ties_at_density_1_with_agreeing_signs_is_the_mean_task_vector(n, d, seed, sign):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(d, generator=g, dtype=torch.float64)}
    taus = [sign * (0.01 + torch.rand(d, generator=g, dtype=torch.float64)) for _ in range(n)]
    fts = [{"w": base["w"] + t} for t in taus]
    merged = merge_state_dicts(base, fts, "ties", density=1.0)
    torch.testing.assert_close(merged["w"], base["w"] + torch.stack(taus).mean(0), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(_state(), st.floats(-2, 2, allow_nan=False))
def test_dare_at_p_0_is_task_arithmetic(state, lam):
    base, fts, _ = state
    weights = [0.5 + i for i in range(len(fts))]
    dare = merge_state_dicts(base, fts, "dare_ta", drop_rate=0.0, lam=lam, weights=weights)
    ta = merge_state_dicts(base, fts, "ta", lam=lam, weights=weights)
    assert all(torch.equal(dare[k], ta[k]) for k in base)


@settings(max_examples=30, deadline=None)
@given(_state(n_models=st.integers(2, 4)), st.randoms(use_true_random=False))
def test_merging_is_invariant_to_model_order(state, rng):
    """TA, TIES and PCB are symmetric in the models (weights follow their model); DARE is not: each
    model's mask is the next draw of the tensor's generator, so reordering reassigns the masks."""
    base, fts, _ = state
    weights = [0.5 + 0.25 * i for i in range(len(fts))]
    order = list(range(len(fts)))
    rng.shuffle(order)
    for method, params in [("ta", {}), ("ties", {"density": 0.5}), ("pcb", {"ratio": 0.3})]:
        a = merge_state_dicts(base, fts, method, weights=weights, **params)
        b = merge_state_dicts(
            base, [fts[i] for i in order], method, weights=[weights[i] for i in order], **params
        )
        for name in base:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(_state())
def test_merged_tensors_stay_within_the_span_of_the_models_for_ties(state):
    """TIES' disjoint mean (weights 1, lam 1) lies between the smallest and largest task vector entry."""
    base, fts, _ = state
    merged = merge_state_dicts(base, fts, "ties", density=0.5)
    for name in base:
        taus = torch.stack([f[name] - base[name] for f in fts])
        out = merged[name] - base[name]
        lo = torch.minimum(taus.min(0).values, torch.zeros_like(out))
        hi = torch.maximum(taus.max(0).values, torch.zeros_like(out))
        assert bool(((out >= lo - 1e-12) & (out <= hi + 1e-12)).all())


# ---- per-expert thresholds ----


def _fused_inputs():
    """One fused expert tensor (4 experts x 3 x 5): expert 0 moved a lot, the others a little."""
    g = torch.Generator().manual_seed(7)
    base = {"layers.0.mlp.experts.down_proj": torch.randn(4, 3, 5, generator=g, dtype=torch.float64)}
    tau = torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * torch.tensor([10.0, 0.1, 0.1, 0.1]).view(
        4, 1, 1
    )
    return base, [{"layers.0.mlp.experts.down_proj": base["layers.0.mlp.experts.down_proj"] + tau}]


# TIES keeps max(1, int(d * density)) entries; PCB keeps those above its int(d * (1 - ratio))-th score
@pytest.mark.parametrize(
    "method,params,per_expert_count,at_once_count",
    [("ties", {"density": 0.2}, 3, 12), ("pcb", {"ratio": 0.2}, 2, 11)],
)
def test_densities_are_per_expert_on_fused_expert_tensors(method, params, per_expert_count, at_once_count):
    base, fts = _fused_inputs()
    name = "layers.0.mlp.experts.down_proj"
    per_expert = merge_state_dicts(base, fts, method, **params)[name] - base[name]
    fused_at_once = merge_state_dicts(base, fts, method, experts={}, **params)[name] - base[name]
    kept_per_expert = (per_expert != 0).flatten(1).sum(1)
    kept_at_once = (fused_at_once != 0).flatten(1).sum(1)
    # each expert keeps its own 20% of its 15 entries; over the fused tensor, expert 0 takes them all
    assert kept_per_expert.tolist() == [per_expert_count] * 4
    assert kept_at_once.tolist() == [at_once_count, 0, 0, 0]


def test_per_expert_merge_equals_merging_each_expert_alone():
    base, fts = _fused_inputs()
    name = "layers.0.mlp.experts.down_proj"
    fts = fts + [{name: base[name] + 0.05 * torch.randn(4, 3, 5, dtype=torch.float64)}]
    for method, params in [("ties", {"density": 0.4}), ("pcb", {"ratio": 0.3})]:
        fused = merge_state_dicts(base, fts, method, **params)[name]
        for e in range(4):
            alone = merge_state_dicts(
                {"x": base[name][e]}, [{"x": f[name][e]} for f in fts], method, **params
            )["x"]
            torch.testing.assert_close(fused[e], alone, rtol=0, atol=1e-12)


def test_explicit_expert_counts_split_dim_0():
    """A layout like DBRX's (E*I, H): the mapping names the number of experts along dim 0."""
    g = torch.Generator().manual_seed(8)
    base = {"ffn.w1": torch.randn(8, 3, generator=g, dtype=torch.float64)}
    fts = [
        {
            "ffn.w1": base["ffn.w1"]
            + torch.randn(8, 3, generator=g, dtype=torch.float64)
            * torch.tensor([5.0] * 4 + [0.1] * 4).view(8, 1)
        }
    ]
    out = merge_state_dicts(base, fts, "ties", density=0.5, experts={"ffn.w1": 2})["ffn.w1"] - base["ffn.w1"]
    assert (out != 0).reshape(2, -1).sum(1).tolist() == [6, 6]


def test_every_method_moves_the_model_towards_the_finetuned_ones():
    base, fts = _models(3, shape=(10, 20), seed=9)
    for method in ("ta", "ties", "dare_ta", "dare_ties", "pcb"):
        merged = merge_state_dicts(base, fts, method)
        delta = merged["w"] - base["w"]
        mean_tau = torch.stack([f["w"] - base["w"] for f in fts]).mean(0)
        assert delta.abs().sum() > 0, method
        assert float((delta * mean_tau).sum()) > 0, method  # points along the average update


def test_empty_tensors_pass_through():
    base, fts = _models(2)
    base["empty"] = torch.zeros(0, 4)
    for f in fts:
        f["empty"] = torch.zeros(0, 4)
    for method in ("ta", "ties", "dare_ties", "pcb"):
        assert merge_state_dicts(base, fts, method)["empty"].shape == (0, 4)


def test_integer_buffers_are_copied_and_must_agree():
    base, fts = _models(2, seed=10)
    base["count"] = torch.arange(3)
    for f in fts:
        f["count"] = torch.arange(3)
    assert torch.equal(merge_state_dicts(base, fts, "ta")["count"], torch.arange(3))
    fts[1]["count"] = torch.arange(3) + 1
    with pytest.raises(ConfigError, match=r"finetuned\[1\]: count"):
        merge_state_dicts(base, fts, "ta")


# ---- bad input ----


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("slerp", {}, "method: got 'slerp'"),
        ("ta", {"density": 0.5}, "density: not a parameter of method 'ta'"),
        ("ties", {"density": 0.0}, r"density: got 0.0, expected a number in \(0, 1\]"),
        ("ties", {"density": 1.5}, "density: got 1.5"),
        ("dare_ta", {"drop_rate": 1.0}, r"drop_rate: got 1.0, expected a number in \[0, 1\)"),
        ("dare_ta", {"seed": 1.5}, "seed: got 1.5, expected an integer"),
        ("pcb", {"ratio": -0.1}, "ratio: got -0.1"),
        ("pcb", {"lam": float("nan")}, "lam: got nan"),
        ("ta", {"weights": [1.0]}, "weights: got .*expected a list of 2 numbers"),
        ("ta", {"weights": [1.0, "x"]}, r"weights\[1\]: got 'x'"),
        ("ta", {"experts": 3}, "experts: got int"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_the_field(method, params, match):
    base, fts = _models(2)
    with pytest.raises(ConfigError, match=match) as info:
        merge_state_dicts(base, fts, method, **params)
    assert "\n" not in str(info.value)


def test_bad_state_dicts_name_the_model_and_tensor():
    base, fts = _models(2)
    with pytest.raises(ConfigError, match=r"finetuned: expected a non-empty list"):
        merge_state_dicts(base, [], "ta")
    bad = [fts[0], {"w": fts[1]["w"]}]
    with pytest.raises(ConfigError, match=r"finetuned\[1\]: tensor 'b' is missing"):
        merge_state_dicts(base, bad, "ta")
    bad = [fts[0], {**fts[1], "extra": torch.zeros(1)}]
    with pytest.raises(ConfigError, match=r"finetuned\[1\]: tensor 'extra' is not in the base"):
        merge_state_dicts(base, bad, "ta")
    bad = [fts[0], {**fts[1], "w": torch.zeros(6, 11, dtype=torch.float64)}]
    with pytest.raises(
        ConfigError, match=r"finetuned\[1\]: w: shape \(6, 11\) differs from the base's \(6, 10\)"
    ):
        merge_state_dicts(base, bad, "ta")
    bad = [fts[0], {**fts[1], "w": torch.full((6, 10), float("nan"), dtype=torch.float64)}]
    with pytest.raises(ConfigError, match=r"finetuned\[1\]: w: has NaN"):
        merge_state_dicts(base, bad, "ta")
    with pytest.raises(ConfigError, match=r"experts: w: 4 experts do not divide"):
        merge_state_dicts(base, fts, "ties", experts={"w": 4})


def test_trim_keeps_exactly_k_entries_even_among_equal_magnitudes():
    rows = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0]]).repeat(2, 1).view(2, 1, 10)
    assert (m.trim_to_density(rows, 0.3) != 0).sum(-1).flatten().tolist() == [3, 3]
    assert (m.trim_to_density(rows, 0.01) != 0).sum(-1).flatten().tolist() == [1, 1]  # at least one
