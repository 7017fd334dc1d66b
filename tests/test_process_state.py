"""The library leaves the process alone: importing it changes no environment variable, thread count
or allocator setting and starts no thread; only the CLI (or an explicit call) tunes the runtime; a
process that ran the expert workers exits cleanly."""

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

# Runs an MoE layer on the expert workers (two threads), then exits. The workers run the experts
# where the native kernel does not (with it, SwiGLU experts run on torch's own threads): it is off.
USE_THE_WORKERS = """
import os
os.environ["MOEKIT_NATIVE"] = "0"
from moekit.runtime import tune_cpu_runtime
tune_cpu_runtime()
import threading
import torch
torch.set_num_threads(2)
from moekit import MoE, MoEConfig, preset
from moekit.dispatch.workers import workers_enabled
layer = MoE(MoEConfig(hidden_size=128, ff_size=256, router=preset("qwen3_moe", 8, 2)))
x = torch.randn(4096, 128, requires_grad=True)
layer(x).sum().backward()
names = [t.name for t in threading.enumerate()]
print(workers_enabled(), any(n.startswith("moekit-expert") for n in names))
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


def test_a_process_that_ran_the_workers_exits_cleanly():
    result = run_python(USE_THE_WORKERS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]  # the workers really ran
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
