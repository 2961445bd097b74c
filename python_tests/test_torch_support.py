"""The torch version check csd_ext runs at import (csd_ext/_torch_support.py)."""

import pytest
import torch

from csd_ext import _torch_support
from csd_ext._torch_support import torch_problem


def test_supported_versions_pass():
    assert torch_problem("2.13.0+cpu") is None
    assert torch_problem("2.13.0+cpu", built_against="2.13.1") is None  # patch releases share the ABI
    assert torch_problem("2.14.1+cu130", built_against="2.14.1+cu130") is None
    assert torch_problem("2.4.0") is None
    assert torch_problem("3.0.0.dev20270101") is None


def test_too_old_a_torch_is_named():
    message = torch_problem("2.3.1")
    assert "needs torch >= 2.4" in message and "torch 2.3.1 is installed" in message


def test_another_minor_version_than_the_build_is_named():
    message = torch_problem("2.14.1+cu130", built_against="2.13.0+cpu")
    assert "built against torch 2.13.0+cpu" in message and "torch 2.14.1+cu130 is installed" in message
    assert "pip install --no-build-isolation" in message


def test_check_torch_raises_import_error(monkeypatch):
    monkeypatch.setattr(_torch_support, "built_against", lambda: "1.0.0")
    with pytest.raises(ImportError, match="built against torch 1.0.0"):
        _torch_support.check_torch()
    monkeypatch.setattr(_torch_support, "built_against", lambda: torch.__version__)
    _torch_support.check_torch()
