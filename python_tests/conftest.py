"""Shared pytest set-up: hypothesis profiles and the devices to test on."""

import os

import pytest
import torch
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
