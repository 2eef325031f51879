"""Triplet loss with in-batch mining, forward + backward, every provider (the fused one of the device,
eager, torch.compile of the eager reference, pytorch-metric-learning, the Gram-matrix GEMM floor)."""

import pytest
from conftest import DEVICE

from facekernels.benchmark.ops import OPS, TripletShape

OP = OPS["triplet"]
BATCHES = (1024, 4096) if DEVICE.type == "cuda" else (256, 1024)
SHAPES = [TripletShape(b, 512, 4, mining) for mining in ("semihard", "hard") for b in BATCHES]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.mining}-B{s.batch}-d{s.features}-K{s.per_class}")
@pytest.mark.parametrize("provider", OP.default_providers(DEVICE))
def test_triplet(run_case, provider, shape):
    run_case(OP, provider, shape)
