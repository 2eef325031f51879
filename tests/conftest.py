"""Test set-up: Triton's interpreter on machines without a GPU, and the gpu / slow markers."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# bfloat16 tl.dot under the interpreter (tests/interpreter_bf16.py); without triton the Triton tests skip
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_bf16  # noqa: E402

    try:
        interpreter_bf16.install()
    except ImportError:
        pass

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# property-based tests: a quick profile by default (CI), `--hypothesis-profile=long` for >= 500 examples
settings.register_profile("quick", max_examples=25, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pytest_configure(config):
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("quick")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped, with the reason, without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)
