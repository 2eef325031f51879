"""The GPU heads' speed structure, proven without a GPU: every Triton launch the heads make at the target shapes
(B in {256, 1024}, d in {128, 256, 512}, bfloat16 / float16 / float32, every negatives kind, an even and an odd
C of a million classes) is captured from the real host code and compiled for an H100 (sm_90) by the kernel's
own JIT, on the newest triton installed and on triton 3.6.0 (the GPU machine's): each kernel holding a tl.dot
must lower to wgmma (HGMMA in its SASS, no HMMA) and no kernel may spill (facekernels/benchmark/sm90.py).

CI installs triton 3.6.0 into .ci-cache/triton-3.6.0 (.ci/run); elsewhere point FACEKERNELS_TRITON_360 at a
directory holding it (`pip install --no-deps --target DIR triton==3.6.0`)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the static sm_90 compile of every kernel on two tritons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_360 = os.environ.get("FACEKERNELS_TRITON_360", os.path.join(ROOT, ".ci-cache", "triton-3.6.0"))


def _report(extra_path=None):
    """(triton version, facts of every captured launch) from a fresh process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said explicitly
    done = subprocess.run([sys.executable, "-m", "facekernels.benchmark.sm90"], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[0]["triton"], lines[1:]


def _check(version, launches):
    assert launches, "no launch captured"
    kernels = {f["kernel"] for f in launches}
    # the heads' path: inverse norms, the forward log-sum-exp and its splits' combine, the backward logits gradient
    assert {"_inv_norm_kernel", "_target_rows_kernel", "_update_t_kernel", "_lse_partial_kernel", "_combine_lse_kernel",
            "_grad_logits_kernel"} <= kernels, kernels
    failures = []
    for f in launches:
        where = (f"triton {version}: {f['kernel']} {f['dtype']} B={f['batch']} d={f['features']} "
                 f"negatives={f['negatives']} C={f['classes']} grid={f['grid']} {f['constexprs']}")  # fmt: skip
        if f["spill_bytes"] or f["spill_instructions"]:
            failures.append(f"{where}: {f['spill_bytes']} spill bytes, {f['spill_instructions']} STL/LDL")
        if f["uses_dot"]:
            hgmma = [m for m in f["sass_mma"] if m.startswith("HGMMA")]
            if not (f["ptx_wgmma"] and hgmma) or f["ptx_mma_sync"] or any(m.startswith("HMMA") for m in f["sass_mma"]):
                failures.append(f"{where}: tl.dot lowers to {f['sass_mma']} (wgmma in PTX: {f['ptx_wgmma']})")
    assert not failures, "\n".join(failures)
    assert any(f["uses_dot"] for f in launches)
    # float32 is compiled as it runs under torch's default float32 matmul precision, "highest": three TF32
    # products (tf32x3), the variant with the most live values
    precisions = {f["constexprs"]["DOT_PRECISION"] for f in launches
                  if f["dtype"] == "float32" and "DOT_PRECISION" in f["constexprs"]}  # fmt: skip
    assert precisions == {"tf32x3"}, precisions


def _compiler_or_skip():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton has no CUDA backend to compile with: {err}")


def test_every_launch_is_wgmma_without_spills_newest_triton():
    _compiler_or_skip()
    _check(*_report())


def test_every_launch_is_wgmma_without_spills_triton_360():
    _compiler_or_skip()
    if not os.path.isdir(os.path.join(TRITON_360, "triton")):
        pytest.skip(f"triton 3.6.0 is not installed at {TRITON_360} (.ci/run installs it there)")
    version, launches = _report(TRITON_360)
    assert version == "3.6.0", version
    _check(version, launches)
