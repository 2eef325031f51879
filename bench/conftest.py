"""pytest-benchmark suites of the ops (``pytest bench/ --benchmark-only``): the same
``setup(provider, shape)`` steps as ``facekernels-bench``, on the device this machine has.

Triton is never benchmarked under its interpreter: the fused Triton provider needs a CUDA device.
"""

import pytest
import torch

from facekernels.benchmark import measure

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def run_case(benchmark):
    """Benchmark ``op``'s step for (provider, shape, mode); unavailable providers are skipped with the
    reason (this is a benchmark run, not the test suite); peak memory goes to extra_info."""

    def run(op, provider, shape, mode="full"):
        reason = op.probe(provider, DEVICE)
        if reason is not None:
            pytest.skip(f"{provider}: {reason}")
        step = op.setup(provider, shape, mode, DEVICE)
        step()  # warm-up (torch.compile has already compiled in setup)
        peak, note, _ = measure.peak_memory_mib(step, DEVICE)
        benchmark.extra_info.update(peak_memory_mib=round(peak, 3), device=str(DEVICE), memory_note=note,
                                    compile_s=getattr(step, "compile_s", None))  # fmt: skip
        if DEVICE.type == "cuda":
            benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
        else:
            benchmark.pedantic(step, rounds=5, warmup_rounds=1)

    return run
