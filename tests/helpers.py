"""Plain functions the test modules share: hypothesis tests cannot take pytest fixtures, so what
they need is imported from here (the tests folder is on `sys.path` under pytest)."""

from contextlib import contextmanager

import torch


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

