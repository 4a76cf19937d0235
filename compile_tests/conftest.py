"""Shared test settings: hypothesis profiles, the GPU marker, small helpers."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Default: a fixed example sequence, so that CI's run time and outcome are reproducible.
# BSA_HYPOTHESIS_PROFILE=explore draws fresh examples on every run (and keeps a database).
settings.register_profile("ci", deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("BSA_HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (FlexAttention backward and LSE exist only on CUDA)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
