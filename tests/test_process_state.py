"""The library leaves the process alone: importing it changes no environment variable, thread count
or allocator setting and starts no thread; only the CLI (or an explicit call) tunes the runtime; a
process that ran the experts on several threads exits cleanly."""

import json
import subprocess
import sys

# Imports every public module, then reports what the process looks like.
IMPORT_EVERYTHING = """
import json, os, sys, threading
before_env = dict(os.environ)
import torch
before_threads = torch.get_num_threads()
import moekit, moekit.layer, moekit.models.lm, moekit.train.trainer, moekit.train.cli, moekit.demo
import moekit.dispatch.grouped, moekit.kernels.gemm, moekit.kernels.native, moekit.kernels.record
import moekit.interop.hf, moekit.interop.patch, moekit.analysis.cli, moekit.preflight, moekit.cli
changed = [k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k)]
print(json.dumps({
    "env_changed": sorted(changed),
    "threads": [torch.get_num_threads(), before_threads],
    "python_threads": threading.active_count(),
    "native_loaded": hasattr(torch.ops, "moekit") and hasattr(torch.ops.moekit, "mm_into"),
}))
"""

# Runs an MoE layer's experts on two threads, then exits; no Python thread is left behind.
USE_THE_THREADS = """
from moekit.runtime import tune_cpu_runtime
tune_cpu_runtime()
import threading
import torch
torch.set_num_threads(2)
from moekit import MoE, MoEConfig, preset
import moekit.dispatch.grouped as grouped
plans = []
real_plan = grouped.plan_experts
grouped.plan_experts = lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1]
layer = MoE(MoEConfig(hidden_size=256, ff_size=512, router=preset("qwen3_moe", 8, 2)))
x = torch.randn(4096, 256, requires_grad=True)
layer(x).sum().backward()
print(plans[0].path, getattr(plans[0].products, "threads", 0), threading.active_count())
"""


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_importing_moekit_changes_nothing_in_the_process():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = run_python(IMPORT_EVERYTHING, env=env)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["env_changed"] == []
    assert state["threads"][0] == state["threads"][1]
    assert state["python_threads"] == 1
    assert not state["native_loaded"]  # built and loaded on first use, not on import


def test_the_cli_tunes_the_runtime_before_torch_starts():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os\nfrom moekit.cli import main\nmain([])\nprint('GOMP', os.environ.get('GOMP_SPINCOUNT'))"
    result = run_python(code, env=env)
    assert result.returncode == 0, result.stderr
    assert "GOMP 10000" in result.stdout


def test_a_process_that_ran_the_experts_on_two_threads_exits_cleanly():
    from moekit.kernels.native import native_available

    result = run_python(USE_THE_THREADS)
    assert result.returncode == 0, result.stderr
    path, threads, python_threads = result.stdout.split()
    if native_available():
        assert (path, threads) == ("native", "2")  # the experts really ran on both threads
    assert python_threads == "1"
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
