import os
import tempfile
from pathlib import Path

from moekit.runtime import tune_cpu_runtime

# As the `moekit` command does before torch starts: without it the expert workers stay off.
tune_cpu_runtime()
# Kernel choices measured once per machine (moekit.kernels.store) go to a test cache, shared by
# the test processes (and subprocesses) of a run, not the user's.
os.environ.setdefault(
    "MOEKIT_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"moekit-test-kernels-{os.getuid()}")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from helpers import TILE_KERNEL_UNAVAILABLE, tile_experts, torch_threads  # noqa: E402
from moekit.kernels.native import native_available  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("moekit", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("moekit")

# Threads of tests marked `production_threads`: two, like `moekit train` on this 2-core machine, so
# that the expert workers, whole-expert tasks and the native kernel run as they do for users.
PRODUCTION_THREADS = 2


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite runs on pytest-xdist workers, one per core, and its models are tiny: a second
    OpenMP thread per worker only adds hand-offs. Tests of threaded paths set threads themselves."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _production_threads(request):
    """Tests marked `production_threads` (models, trainer, resume, demo) run on the threads, workers
    and kernels the CLI uses."""
    if request.node.get_closest_marker("production_threads") is None:
        yield
        return
    with torch_threads(PRODUCTION_THREADS):
        yield


@pytest.fixture
def experts_on_tile_kernel(monkeypatch):
    """fp32 experts on moekit's tile kernel whatever this machine's first-use measurement chose
    (`MOEKIT_NATIVE=tile`): the one-call decode paths and `DecodePlan` run where it chose the tile
    kernel, so they are tested on every machine that builds it, not only where it won."""
    if not native_available():
        pytest.skip(TILE_KERNEL_UNAVAILABLE)
    monkeypatch.setenv("MOEKIT_NATIVE", "tile")
    assert tile_experts()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> a tiny random model of that HF family loaded by moekit (hidden 32: whole 64-byte
    weight rows), made once per test module."""
    pytest.importorskip("transformers", reason="transformers is installed by the `hf` extra")
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import tiny_model

    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            tiny_model(family, seed=3).save_pretrained(folder)
            cache[family] = from_hf(folder).eval()
        return cache[family]

    return get
