"""The decode step's fast paths: each gives what the path it short-cuts gives (bit for bit where
it runs the same kernels), against float64, on one thread and on two."""

import dataclasses
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.dispatch.few_rows as few_rows_module
import moekit.kernels.native as native_module
import moekit.layer as layer_module
from helpers import LOOPS_UNAVAILABLE, needs_tile_kernel, saved_and_loaded
from moekit.dispatch.grouped import grouped_experts
from moekit.dispatch.reference import reference_moe
from moekit.interop.attention import RMSNorm
from moekit.layer import MoE, MoEConfig
from moekit.routing.spec import preset

# also run by `make test` on the kernel built for the CPU's other vector set
pytestmark = pytest.mark.other_vector_set


def hf_rms_norm(x, weight, eps):
    """transformers' RMSNorm, operation for operation."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    width=st.sampled_from([1, 7, 16, 32, 100, 1024]),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**16),
)
def test_fp32_rms_norm_in_one_op_is_transformers_arithmetic_bit_for_bit(rows, width, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(width, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=gen))
    x = torch.randn(rows, 1, width, generator=gen) * 3
    assert torch.equal(norm(x), hf_rms_norm(x, norm.weight, eps))
    exact = hf_rms_norm(x.double(), norm.weight.double(), eps)
    torch.testing.assert_close(norm(x).double(), exact, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (3, 1), (8, 1), (1, 6), (2, 4)]),
    width=st.one_of(st.integers(1, 300), st.sampled_from([1024, 2048, 2880, 4096])),
    eps=st.sampled_from([1e-6, 1e-5, 1e-20]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_kernel_is_torch_rms_norm_bit_for_bit(shape, width, eps, weighted, seed):
    """moekit's kernel for a few rows gives torch.rms_norm's values bit for bit (where its probe
    passed, as on every machine the tests run on: the probe failing here fails the test), and
    float64's to rounding."""
    from moekit.kernels import native, rms_norm

    if not native.loops_available():
        pytest.skip(LOOPS_UNAVAILABLE)
    assert rms_norm.matches_torch()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, width, generator=gen) * 3
    weight = torch.randn(width, generator=gen) if weighted else None
    with torch.inference_mode():
        assert rms_norm.fits(x, weight) == (x.numel() < rms_norm.MAX_ELEMENTS)
        ours = rms_norm.rms_norm(x, weight, eps)
    assert torch.equal(ours, torch.rms_norm(x, (width,), weight, eps))
    exact = hf_rms_norm(x.double(), torch.ones(width).double() if weight is None else weight.double(), eps)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


def test_rms_norm_module_takes_the_kernel_for_decode_rows_only():
    """The RMSNorm module runs the kernel for a decode step's rows outside autograd, torch's op
    for many rows (torch's sum then splits a row's additions over threads) and under autograd."""
    from moekit.kernels import rms_norm

    norm = RMSNorm(64, 1e-6)
    calls = []
    original = rms_norm.rms_norm

    def counted(*args):
        calls.append(1)
        return original(*args)

    with patch.object(rms_norm, "rms_norm", counted):
        with torch.no_grad():
            small = norm(torch.randn(2, 1, 64))
            norm(torch.randn(8, 1024, 64))
        norm(torch.randn(2, 1, 64))
    assert len(calls) == (1 if rms_norm.matches_torch() else 0)
    assert small.shape == (2, 1, 64)


def test_rms_norm_keeps_transformers_steps_for_other_dtypes():
    """float64 is normalised in fp32 (as transformers does), bf16 through fp32: not the fused op."""
    norm = RMSNorm(16, 1e-6)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(3, 16).to(dtype)
        assert torch.equal(norm(x), hf_rms_norm(x, norm.weight, 1e-6))


def small_layer(activation="swiglu", bias=False, weight_on="output", seed=0):
    torch.manual_seed(seed)
    router = preset("qwen3_moe", 8, 2)
    if weight_on == "input":
        router = dataclasses.replace(router, weight_on="input")
    config = MoEConfig(hidden_size=32, ff_size=16, router=router, activation=activation, expert_bias=bias)
    layer = MoE(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def assert_planned_and_exact(fast, planned, layer, x, mask):
    """The fast path's output is the planned path's bit for bit and the float64 layer's to rounding
    (the layer is cast back to fp32 after)."""
    assert torch.equal(fast.reshape(planned.shape), planned)
    reference = reference_moe(layer.double(), x.double(), mask).output
    layer.float()
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", ["auto", "mm", "0"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "activation,bias,weight_on",
    [("swiglu", False, "output"), ("gelu", True, "output"), ("swiglu", True, "input")],
)
def test_few_rows_experts_equal_the_planned_path_and_float64(
    threads, activation, bias, weight_on, native, monkeypatch
):
    """A decode step (one token per row, a row masked; one row alone; every row masked) outside
    autograd takes the few-rows path: the C++ loops' whole-SwiGLU call where they run these
    experts, else grouped_mm; a step of real rows only on the tile kernel goes from the router's
    top-k to the experts in one call (`routed_rows`). Its output is the planned path's of the same
    kernel bit for bit, and the float64 reference's."""
    monkeypatch.setenv("MOEKIT_NATIVE", native)
    layer = small_layer(activation, bias, weight_on)
    whole = activation == "swiglu" and not bias and weight_on == "output" and native_module.loops_available()
    kernels = []
    original, original_routed = few_rows_module.few_rows_experts, layer_module.routed_rows

    def counted(*args, kernel, threads, **kwargs):
        kernels.append(kernel)
        assert threads == 1  # experts this small: one thread
        return original(*args, kernel=kernel, threads=threads, **kwargs)

    def counted_routed(*args):
        taken = original_routed(*args)
        if taken is not None:
            kernels.append("topk")
        return taken

    for x, mask in (
        (torch.randn(3, 1, 32), torch.tensor([[True], [False], [True]])),
        (torch.randn(1, 1, 32), None),
        (torch.randn(2, 1, 32), torch.tensor([[False], [False]])),  # no assignment at all
    ):
        kernels.clear()
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            with (
                torch.inference_mode(),
                patch.object(few_rows_module, "few_rows_experts", counted),
                patch.object(layer_module, "routed_rows", counted_routed),
            ):
                fast = layer(x, mask)
            kernel = "grouped_mm"
            if whole:
                kernel = native_module.expert_kernel(x, layer.experts.w_in, decode=True)
            assert kernels == ["topk" if mask is None and kernel == "tile" else kernel]
            experts = layer.experts
            with torch.inference_mode():
                routing = layer.router(x.reshape(-1, 32), None if mask is None else mask.reshape(-1))
                a = routing.compute_assignments
                planned = grouped_experts(
                    x.reshape(-1, 32), a.token, a.expert, a.weight, experts.w_in, experts.w_out,
                    experts.b_in, experts.b_out, experts.activation, weight_on,
                    backend="auto" if whole else "grouped_mm", threads=1 if whole else None,
                )  # fmt: skip
        finally:
            torch.set_num_threads(previous)
        assert_planned_and_exact(fast, planned, layer, x, mask)


def test_few_rows_path_is_not_taken_where_gradients_or_large_experts_are():
    layer = small_layer()
    x = torch.randn(2, 1, 32)
    experts = layer.experts
    args = (experts.w_in, experts.w_out, None, None)
    for whole in (False, True):
        with torch.no_grad():
            assert few_rows_module.few_rows_kernel(x, 4, *args, whole=whole) is not None
            assert few_rows_module.few_rows_kernel(x, 10**6, *args, whole=whole) is None  # long reads
        assert few_rows_module.few_rows_kernel(x, 4, *args, whole=whole) is None  # weights' gradients


def decode_logits(model, steps=3, batch=2):
    """Logits of a few one-token steps after a prompt, through the KV cache."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, 5), generator=gen)
    cache = model.new_cache(capacity=5 + steps)
    out = [model(ids, cache=cache).logits[:, -1]]
    for _ in range(steps):
        token = out[-1].argmax(-1, keepdim=True)
        out.append(model(token, cache=cache).logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "family,joined", [("qwen3_moe", True), ("mixtral", True), ("olmoe", False), ("dbrx", False)]
)
def test_joint_projection_of_a_decode_step_is_the_separate_path_bit_for_bit(
    families, family, joined, threads
):
    """A one-token step of a small fp32 model joins q, k and v into one product (and Qwen3's
    per-head norms and the rotations into one each) where that keeps the values: the logits equal
    those of the separate products bit for bit, and the float64 model's to rounding. Not joined:
    OLMoE's norm over the whole projection (and its clipping), DBRX's fused projection."""
    from moekit.interop.attention import Attention

    model = families(family)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            fast = decode_logits(model)
            attention = [layer.attn for layer in model.layers]
            assert all((a.__dict__.get("_joint", (None, None))[1] is not None) == joined for a in attention)
            with patch.object(Attention, "_joint_projection", lambda self, x: None):
                separate = decode_logits(model)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(fast, separate)
    with torch.inference_mode():
        exact = decode_logits(model.double())
    model.float()
    torch.testing.assert_close(fast.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@needs_tile_kernel
def test_cached_attention_step_in_one_call_is_the_ops_bit_for_bit(families, family, threads):
    """A one-token step of a full-attention layer normalises, rotates and appends its keys and
    values in one call (`kernels.attention_step`: Qwen3's per-head norms, Qwen2-MoE's biases and no norm): the
    logits of the separate ops bit for bit, batch rows with their own positions included."""
    from moekit.interop.attention import Attention

    model = families(family)
    taken = []
    original = Attention._cached_step

    def counted(self, *args):
        out = original(self, *args)
        taken.append(out is not None)
        return out

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            with patch.object(Attention, "_cached_step", counted):
                fast = decode_logits(model, batch=3)
            with patch("moekit.kernels.attention_step.fits", lambda *a: False):
                ops = decode_logits(model, batch=3)
    finally:
        torch.set_num_threads(previous)
    assert taken and all(taken)  # every decoding step of every layer
    assert torch.equal(fast, ops)


def test_joint_projection_follows_weight_changes_and_stays_out_of_autograd(families):
    """The joined matrices are rebuilt when a projection's weight changes in place; a step whose
    weights want gradients keeps the separate products."""
    from moekit.interop.attention import Attention

    model = families("qwen3_moe")
    attention = model.layers[0].attn
    with torch.no_grad():
        attention.k_proj.weight.mul_(1.5)
        attention.q_norm.weight.add_(0.25)
    with torch.inference_mode():
        fast = decode_logits(model)
        with patch.object(Attention, "_joint_projection", lambda self, x: None):
            separate = decode_logits(model)
    assert torch.equal(fast, separate)
    x = torch.randn(1, 1, model.config.hidden_size)
    assert attention._joint_projection(x) is None  # the weights require grad here
    with torch.no_grad():
        assert attention._joint_projection(x) is not None


@pytest.fixture(scope="module")
def wide_attention_model(tmp_path_factory):
    """A Qwen3-MoE model whose q, k and v weights each read more than a thread hand-off pays for
    (hidden 1024, 16 query and 4 key/value heads of 64): one layer, few small experts."""
    pytest.importorskip("transformers", reason="transformers is installed by the `hf` extra")
    return saved_and_loaded(
        tmp_path_factory.mktemp("wide"), "qwen3_moe", seed=5, vocab_size=64, hidden_size=1024,
        num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@needs_tile_kernel
def test_joint_projection_of_large_weights_reads_them_in_place_bit_for_bit(wide_attention_model, threads):
    """Where q, k and v are large, a one-token step reads all three in one call of
    the row kernel, without a joined copy, and one norm and rotation follow: the logits of the
    separate products bit for bit (each is the row kernel's there too), and the float64 model's to
    rounding, on one thread and two."""
    from moekit.interop.attention import Attention
    from moekit.kernels import rows_linear

    model = wide_attention_model
    attention = model.layers[0].attn
    calls = []
    original = rows_linear.linear_parts

    def counted(*args):
        calls.append(1)
        return original(*args)

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            with patch("moekit.interop.attention.linear_parts", counted):
                fast = decode_logits(model, batch=1)
            with patch.object(Attention, "_joint_projection", lambda self, x: None):
                separate = decode_logits(model, batch=1)
    finally:
        torch.set_num_threads(previous)
    assert attention.__dict__["_joint"][1][0] is None  # no joined copy of large weights
    assert len(calls) == 3  # the three decoding steps
    assert torch.equal(fast, separate)
    with torch.inference_mode():
        exact = decode_logits(model.double(), batch=1)
    model.float()
    torch.testing.assert_close(fast.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("experts_on_tile_kernel")
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_of_larger_experts_takes_one_call_on_the_callers_threads(threads):
    """Experts whose reads pay a thread hand-off, at decode sizes outside autograd, run whole in
    one C++ call on the caller's threads: the planned decode path's values bit for bit, and the
    float64 reference's; many rows per expert keep the planned path."""
    torch.manual_seed(0)
    router = preset("qwen3_moe", 16, 4)
    layer = MoE(MoEConfig(hidden_size=256, ff_size=512, router=router)).eval()
    x = torch.randn(2, 1, 256)
    experts = layer.experts
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            a = layer.router(x.reshape(-1, 256)).compute_assignments
            args = (experts.w_in, experts.w_out, a.weight, None, None)
            assert few_rows_module.few_rows_kernel(x, len(a), *args, whole=True, expert=a.expert) == (
                "tile",
                threads,
            )
            many = torch.zeros(64, dtype=torch.long)
            assert few_rows_module.few_rows_kernel(x, 64, *args, whole=True, expert=many) is None
            fast = layer(x)
            planned = grouped_experts(
                x.reshape(-1, 256), a.token, a.expert, a.weight, experts.w_in, experts.w_out,
                None, None, experts.activation, "output", threads=threads,
            )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    assert_planned_and_exact(fast, planned, layer, x, None)


@needs_tile_kernel
@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    outputs=st.integers(1, 300),
    inner=st.integers(1, 200),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_rows_linear_kernel_against_float64(rows, outputs, inner, bias, threads, seed):
    """moekit's row kernel for a decoding step's dense products: x @ W^T + b for a few rows, the
    weight's rows split over threads (row and column tails, strided x rows), against float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner + 3, generator=gen)[:, :inner]  # rows a stride apart
    weight = torch.randn(outputs, inner, generator=gen)
    b = torch.randn(outputs, generator=gen) if bias else None
    ours = torch.ops.moekit.rows_linear(x, weight, b, threads)
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5 * inner**0.5)


@needs_tile_kernel
def test_decode_linear_takes_the_kernel_for_large_reads_on_any_thread_count():
    """`decode_linear` runs the row kernel for a few rows against a weight large enough to split,
    outside autograd, giving the same values on one thread and two; F.linear otherwise. Its
    values are F.linear's to rounding (the two sum in different orders)."""
    from moekit.kernels import rows_linear

    weight = torch.randn(1024, 512)  # 2 MB: its read pays a thread hand-off
    x = torch.randn(1, 1, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert rows_linear.fits(x, weight, None)
            assert not rows_linear.fits(torch.randn(5, 512), weight, None)  # more rows than the kernel's
            assert not rows_linear.fits(x, weight[:8], None)  # too small a read to split
            out = rows_linear.decode_linear(x, weight)
        torch.set_num_threads(1)
        with torch.no_grad():
            assert rows_linear.fits(x, weight, None)  # one thread too: the same values either way
            assert torch.equal(rows_linear.decode_linear(x, weight), out)
        assert not rows_linear.fits(x, weight.requires_grad_(), None)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight.detach()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "activation,bias,weight_on",
    [("swiglu", False, "output"), ("gelu", True, "output"), ("swiglu", True, "input")],
)
def test_compiled_paths_gathered_form_equals_float64_and_drops_null_experts(activation, bias, weight_on):
    """With fewer assignments than experts `compiled_experts` gathers each assignment's expert
    weights (the arithmetic the few-rows path shares): the float64 reference's output, and an
    assignment to a null expert (id E) changes nothing."""
    from moekit.dispatch.compiled import compiled_experts

    layer = small_layer(activation, bias, weight_on)
    x = torch.randn(3, 32)
    experts = layer.experts
    args = (experts.w_in, experts.w_out, experts.b_in, experts.b_out, experts.activation, weight_on)
    with torch.no_grad():
        a = layer.router(x, None).compute_assignments
        assert len(a.token) < experts.w_in.shape[0]  # the gathered form, not the dense one
        got = compiled_experts(x, a.token, a.expert, a.weight, *args)
        null = experts.w_in.shape[0]
        token, expert = torch.cat([a.token, a.token[:1]]), torch.cat([a.expert, torch.tensor([null])])
        with_null = compiled_experts(x, token, expert, torch.cat([a.weight, torch.tensor([0.7])]), *args)
    assert torch.equal(got, with_null)
    reference = reference_moe(layer.double(), x.double()).output
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


def general_path(layer, x):
    """The layer's output and routing with the one-call decode path turned off."""
    with patch.object(layer_module, "routed_rows", lambda *args: None):
        return layer.forward_with_routing(x)


def assert_same_routing(fast, general):
    for name in ("logits", "scores", "token_mask"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    for part in ("kept", "dropped"):
        for name in ("token", "expert", "weight", "rank"):
            ours, theirs = getattr(getattr(fast, part), name), getattr(getattr(general, part), name)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), f"{part}.{name}"
    assert fast.num_compute_experts == general.num_compute_experts


@pytest.mark.usefixtures("experts_on_tile_kernel")
@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "dbrx"]),
    rows=st.sampled_from([1, 2, 3, 8, 16]),
    hidden=st.sampled_from([8, 20, 33, 64]),
    ff=st.sampled_from([4, 13, 32]),
    experts_and_k=st.sampled_from([(4, 1), (8, 2), (8, 8), (16, 4)]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_decode_layer_in_one_call_is_the_general_path_bit_for_bit(
    family, rows, hidden, ff, experts_and_k, threads, seed
):
    """A decoding step's MoE layer from the router's top-k to the experts in one call
    (`few_rows.routed_rows`, `moekit::topk_swiglu_rows`) gives the general path's output and every
    field of its routing record bit for bit (the same grouping, ranks and weights, the same
    products and sums), for the routers of the families whose experts take the routing weight on
    their output (Llama 4's on the input runs the general path), any row count below decode's
    bound, tails of the vector width, one thread and two; and the float64 reference's output to
    rounding."""
    num_experts, k = experts_and_k
    overrides = {"num_groups": 2, "topk_groups": 2} if family == "deepseek_v3" else {}
    router = preset(family, num_experts, k, **overrides)
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(hidden_size=hidden, ff_size=ff, router=router)).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0, 0.5)
    x = torch.randn(rows, hidden)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            taken = few_rows_module.routed_rows(layer, x, None)
            fast, routing = layer.forward_with_routing(x)
            expected, expected_routing = general_path(layer, x)
    finally:
        torch.set_num_threads(previous)
    assert taken is not None
    assert torch.equal(taken[0], fast) and torch.equal(fast, expected)
    assert_same_routing(routing, expected_routing)
    with torch.no_grad():
        reference = reference_moe(layer.double(), x.double(), None).output
    # (fp32 rounding of sums of up to 64 products of unit size: 1e-5 of the output's scale)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.usefixtures("experts_on_tile_kernel")
def test_decode_layer_in_one_call_only_where_the_general_path_would_give_the_same():
    """The one-call path steps aside for padding (a token mask), a non-empty routing override,
    training, gradients, capacity limits and decode-exceeding row counts; with a capture-only
    override it runs, and the capture records its routing."""
    from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing

    layer = small_layer()
    x = torch.randn(2, 32)
    with torch.inference_mode():
        assert few_rows_module.routed_rows(layer, x, None) is not None
        assert few_rows_module.routed_rows(layer, x, torch.tensor([True, False])) is None
        assert (
            few_rows_module.routed_rows(layer, torch.randn(few_rows_module.ONE_CALL_ROWS + 1, 32), None)
            is None
        )
        with override_routing(layer, RoutingOverride(mask=[0])):
            assert few_rows_module.routed_rows(layer, x, None) is None
            masked = layer.forward_with_routing(x)[1]
            assert not bool((masked.kept.expert == 0).any())
        capture = RoutingCapture()
        with override_routing(layer, Overrides(capture=capture)):
            assert few_rows_module.routed_rows(layer, x, None) is not None
            _, routing = layer.forward_with_routing(x)
        assert torch.equal(capture.routings[0][0].kept.expert, routing.kept.expert)
    with torch.no_grad():
        layer.train()
        assert few_rows_module.routed_rows(layer, x, None) is None
        layer.eval()
    assert few_rows_module.routed_rows(layer, x, None) is None  # the parameters want gradients
    capped = MoE(MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2, capacity_factor=1.0)))
    with torch.inference_mode():
        assert few_rows_module.routed_rows(capped.eval(), x, None) is None


@pytest.mark.usefixtures("experts_on_tile_kernel")
def test_topk_kernel_refuses_expert_ids_out_of_range():
    x, w_in, w_out = torch.randn(1, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moekit.topk_swiglu_rows(x, torch.tensor([[1, 4]]), torch.ones(1, 2), w_in, w_out, 1)


def test_kv_append_writes_the_steps_bytes_and_refuses_what_does_not_fit():
    """A step's keys and values land in the buffers' slot as the two copies put them (strided
    steps, as the joint projection's split gives them); slots past the buffer are refused."""
    from moekit.inference.kv_cache import LayerCache

    if not native_module.loops_available():
        pytest.skip(LOOPS_UNAVAILABLE)
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, 7, 1, 16, generator=gen) for _ in range(6)]
    with torch.inference_mode():
        ours, theirs = LayerCache(capacity=4), LayerCache(capacity=4)
        for s in range(3):
            qkv = steps[2 * s]  # keys: a strided view of heads 1..3 of a larger tensor
            k, v = qkv[:, 1:4], steps[2 * s + 1][:, :3]
            got = ours.update(k, v)
            with patch("moekit.inference.kv_cache.appends_in_one_call", lambda *a: False):
                want = theirs.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        buffer = torch.zeros(2, 3, 4, 16)
        with pytest.raises(RuntimeError, match="outside the buffer"):
            torch.ops.moekit.kv_append_(buffer, buffer.clone(), steps[0][:, :3], steps[1][:, :3], 4)
