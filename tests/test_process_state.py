"""The library leaves the process alone: importing it changes no environment variable, thread count
or allocator setting and starts no thread; only the CLI (or an explicit call) tunes the runtime; a
process that ran the C++ expert loops on two threads exits cleanly, having started no Python thread."""

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

# Runs an MoE layer's experts on the C++ loops over two of torch's threads, then exits.
USE_THE_LOOPS = """
from moekit.runtime import tune_cpu_runtime
tune_cpu_runtime()
import threading
import torch
torch.set_num_threads(2)
from moekit import MoE, MoEConfig, preset
from moekit.kernels.native import loops_available
layer = MoE(MoEConfig(hidden_size=128, ff_size=256, router=preset("qwen3_moe", 8, 2)))
x = torch.randn(4096, 128, requires_grad=True)
layer(x).sum().backward()
print(loops_available(), threading.active_count())
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


def test_a_process_that_ran_the_expert_loops_exits_cleanly():
    result = run_python(USE_THE_LOOPS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1"]  # the loops ran, on torch's threads, not Python's
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
