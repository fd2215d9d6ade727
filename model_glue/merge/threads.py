"""Temporary torch intra-op thread count for a merge.

Merging is a chain of cheap elementwise passes. With OpenMP, each pass is a parallel
region whose workers spin-wait for each other; when another process holds a core, one
descheduled worker stalls every pass. On a busy 2-core machine this made a merge of
1.1M-parameter models 25x slower (265 ms per call instead of 10 ms) and a 188M-parameter
streaming merge 2-8x slower. Small tensors gain nothing from threads anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous setting.

    The setting is process-wide: other threads running torch meanwhile see it too.
    """
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
