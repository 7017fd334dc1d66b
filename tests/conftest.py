import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("moekit", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("moekit")


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite runs on pytest-xdist workers, one per core, and its models are tiny: a second
    OpenMP thread per worker only adds hand-offs. Tests of threaded paths set threads themselves."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
