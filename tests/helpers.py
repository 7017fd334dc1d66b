"""Plain functions the test modules share: hypothesis tests cannot take pytest fixtures, so what
they need is imported from here (the tests folder is on `sys.path` under pytest)."""

from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch

from moekit.kernels.native import expert_kernel, loops_available, native_available, same_bits

# Why a test of moekit's C++ loops and kernels is skipped, naming every condition that turns them off.
LOOPS_UNAVAILABLE = (
    "moekit's C++ expert loops and kernels do not run here (MOEKIT_NATIVE=0, no C++ compiler, or "
    "their first-use check against torch disagreed)"
)
needs_loops = pytest.mark.skipif(not loops_available(), reason=LOOPS_UNAVAILABLE)

# Why a test of moekit's tile kernel (the row kernel, the attention step) is skipped.
TILE_KERNEL_UNAVAILABLE = (
    "moekit's tile kernel does not run here (MOEKIT_NATIVE off or mm, no AVX2/AVX-512, no "
    "compiler, or its probe against torch.mm disagreed)"
)
needs_tile_kernel = pytest.mark.skipif(not native_available(), reason=TILE_KERNEL_UNAVAILABLE)


def tile_experts() -> bool:
    """Whether fp32 experts run on moekit's tile kernel in this process."""
    return expert_kernel(torch.ones(1), torch.ones(1, 1, 1)) == "tile"


@contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` for the block, restored after it: the suite runs on
    one thread, and the worker paths need a second one to hand experts to."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_lm(seed: int = 0):
    """moekit's LM at the size the test-time routing tests use: three MoE layers of eight experts,
    Qwen3-MoE routing (top 2 of 8), evaluation mode."""
    from moekit.layer import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.routing.spec import preset

    torch.manual_seed(seed)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2))
    config = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, ff_size=48, max_seq_len=48, moe=moe
    )
    return LanguageModel(config).eval()


def training_lm(seed: int = 0, **overrides):
    """An fp32 MoE LM in training mode whose every layer runs on moekit's training kernels: RoPE,
    RMSNorm, a shared expert whose SwiGLU halves are 32 wide (`overrides`: LMConfig's fields)."""
    from moekit.layer import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.routing.spec import preset

    torch.manual_seed(seed)
    moe = MoEConfig(
        hidden_size=32, ff_size=16, router=preset("qwen3_moe", 4, 2), num_shared_experts=1, shared_ff_size=32
    )
    values = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ff_size=32, max_seq_len=32, moe=moe
    )
    return LanguageModel(LMConfig(**{**values, **overrides})).train()


def tiny_models(tmp_path_factory, moekit_model=tiny_lm):
    """`get(name)`: `moekit_model()` for "moekit", else the tiny transformers model of family `name`
    saved and read back by `from_hf` (the path users take); each built once. For a module-scoped
    fixture, so that every test of a module shares its models."""
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import tiny_model

    cache = {}

    def get(name):
        if name not in cache:
            if name == "moekit":
                cache[name] = moekit_model()
            else:
                folder = tmp_path_factory.mktemp(name)
                tiny_model(name, seed=2).save_pretrained(folder)
                cache[name] = from_hf(folder).eval()
        return cache[name]

    return get


def saved_and_loaded(folder, family: str, seed: int, **sizes):
    """A random HF model of `family` at the given sizes (`tiny_config`'s overrides), saved to
    `folder` and loaded by moekit: the same checkpoint both ways."""
    import transformers

    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import randomize_, tiny_config

    hf = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **sizes))
    randomize_(hf, seed=seed).save_pretrained(folder)
    return from_hf(folder).eval()


def autograd_node_names(out: torch.Tensor) -> set[str]:
    """The names of every node of `out`'s autograd graph."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {node.name() for node in seen}


def training_step_gradients(model, ids: torch.Tensor) -> tuple[set[str], dict[str, torch.Tensor]]:
    """One next-token loss's backward through `model` (moekit's LM or an imported family): the
    names of its autograd graph's nodes and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return autograd_node_names(loss), grads


def kernel_against_torch_gradients(
    model, ids, kernel_module, probe: str
) -> tuple[set[str], set[str], list[str]]:
    """`training_step_gradients` with a kernel on, then with its probe reporting failure (torch's
    ops): both graphs' node names, and the parameters whose gradients differ in any bit."""
    names, grads = training_step_gradients(model, ids)
    with patch.object(kernel_module, probe, return_value=False):
        torch_names, torch_grads = training_step_gradients(model, ids)
    assert grads.keys() == torch_grads.keys()
    differing = [n for n, g in grads.items() if not same_bits(g, torch_grads[n])]
    return names, torch_names, differing
