"""CUDA graphs of a decoding step, and the CPU check that a step could be captured.

A step whose state all lives on the device (a static key/value cache, positions and tokens in
fixed buffers) can be captured once and replayed: a replay launches the same kernels as the eager
step with no Python or launch gaps in between. The benchmark (`benchmarks/decoding.py`) and the
server's captured steps (`serving/captured.py`) both capture through `capture`.

A step can be captured only if no operation in it hands a device value to the host (a
synchronisation, which a graph cannot record). `HostSyncs` finds such operations on the CPU, where
tests run.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def capture(step, device, pool=None) -> torch.cuda.CUDAGraph:
    """Capture one call of `step` as a CUDA graph; the state is left as it was before.

    `step`: a callable with `save()` (returns what one call changes) and `restore(saved)`.
    `pool`: a memory pool shared with other graphs that are never replayed at the same time
    (`torch.cuda.graph_pool_handle()`); their temporaries then share memory."""
    saved = step.save()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream: library handles, allocator pools
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    step.restore(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    step.restore(saved)  # capture records without running; restore anyway in case it ran
    return graph


class HostSyncs(TorchDispatchMode):
    """Records the operators run inside it that hand a device value to the host (`seen`): a CUDA
    graph cannot capture those."""

    SYNCS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
