"""Shared pytest set-up: hypothesis profiles and the devices to test on."""

import atexit
import os
import shutil
import tempfile

# torch.compile's on-disk caches (inductor's FX-graph and AOT-autograd caches, by default in
# /tmp/torchinductor_<user>) are keyed by the traced graph and torch's own state, not by
# csd_ext's Python fake/autograd rules nor by the compiled _C.  A cache left on the machine by
# another build of csd_ext (an older stats layout, say) can then serve a stale compiled graph,
# and concurrent runs can clobber each other's files.  So each test run compiles into its own
# empty directory (child processes inherit it); an explicit TORCHINDUCTOR_CACHE_DIR is kept.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="csd_ext_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings

# "ci" (default) keeps the suite inside CI's budget on 2 cores; "thorough" is
# for local soak runs: HYPOTHESIS_PROFILE=thorough pytest python_tests
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
