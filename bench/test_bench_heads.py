"""Margin-softmax heads, forward + backward, every provider (the fused one of the device, eager,
torch.compile of the eager reference, the GEMM floor)."""

import pytest
from conftest import DEVICE

from facekernels.benchmark.ops import OPS, HeadShape

OP = OPS["heads"]
if DEVICE.type == "cuda":
    SHAPES = [HeadShape("arcface", 1024, 512, c, "bfloat16") for c in (100_000, 1_000_000)]
else:
    SHAPES = [HeadShape(h, 256, 512, c) for h in ("arcface", "curricular") for c in (10_000, 30_000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.head}-B{s.batch}-d{s.features}-C{s.classes}-{s.dtype}")
@pytest.mark.parametrize("provider", OP.default_providers(DEVICE))
def test_heads(run_case, provider, shape):
    run_case(OP, provider, shape)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("provider", OP.default_providers(DEVICE))
def test_heads_by_mode(run_case, provider, mode):
    run_case(OP, provider, SHAPES[0], mode)
