"""torch.compile in tests: compile afresh, bypassing the on-disk caches.

Inductor's FX graph cache and AOTAutograd's cache are keyed on the traced
graph and the configuration, not on the Python fake and autograd rules that
csd_ext registers for its ops; a graph compiled by an earlier run (with an
older csd_ext backward) would be reused and the test would check stale code.
"""

import contextlib

import torch


@contextlib.contextmanager
def fresh_compile():
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
