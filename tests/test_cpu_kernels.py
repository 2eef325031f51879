"""What only the compiled CPU kernels have (csrc/cpu/margin_ce.cpp behind facekernels/kernels/cpu.py): the raw
ops' own argument checks and opcheck, the header compiled by plain nvcc, the build hint when the extension is
missing, and the process-level proof that no (B, C) buffer is allocated. Their results against the reference:
tests/test_heads.py, with every other back-end."""

import math
import os
import subprocess
import sys

import kit
import pytest
import torch

from facekernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = kit.needs_ext


def _op_args(batch=6, classes=11, features=5, dtype=torch.float32, negatives=0, subcenters=1, **change):
    """Arguments of margin_lse / margin_backward as the algorithm builds them (targets, some -1)."""
    x, w, y = kit.head_inputs(batch, classes * subcenters, features, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ops = _extension.ops()
    target = torch.where(torch.rand(batch) < 0.3, -1, y // subcenters)
    rows = dict(embeddings=x, weight=w, inv_x=ops.inv_norms(x), inv_w=ops.inv_norms(w), target=target,
                phi=torch.rand(batch, dtype=acc) - 0.5, tau=torch.rand(batch, dtype=acc) - 0.5,
                t=torch.tensor(0.2) if negatives == 2 else None, s=64.0, negatives=negatives, mv_t=0.2,
                cos_bound=1.0, filter_threshold=math.inf, subcenters=subcenters)  # fmt: skip
    rows.update(change)
    return rows


BAD_ARGS = [
    (dict(weight=torch.randn(11, 5, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(weight=torch.randn(11, 4)), ValueError, "same number of features"),
    (dict(target=torch.zeros(6, dtype=torch.int32)), TypeError, "target must be Long"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target must be a CPU tensor of shape"),
    (dict(inv_x=torch.ones(6, dtype=torch.float64)), TypeError, "inv_x must be Float"),
    (dict(inv_w=torch.ones(10)), ValueError, "inv_w must be a CPU tensor of shape"),
    (dict(phi=torch.ones(5)), ValueError, "phi must be"),
    (dict(embeddings=torch.randn(6)), ValueError, "2-D"),
    (dict(negatives=2, t=None), ValueError, "t .* is required"),
    (dict(negatives=2, t=torch.zeros((), dtype=torch.float64)), TypeError, "t must be float32"),
    (dict(negatives=-1), ValueError, "negatives"),
    (dict(s=0.0), ValueError, "s must"),
    (dict(weight=torch.randn(0, 5), inv_w=torch.ones(0)), ValueError, "at least one class"),
    (dict(subcenters=2, weight=torch.randn(11, 5), inv_w=torch.ones(11)), ValueError, "subcenters must be >= 1 and"),
    (dict(cos_bound=1.5), ValueError, "cos_bound must be in"),
]


@pytest.mark.parametrize("change, error, words", BAD_ARGS)
def test_raw_ops_reject_bad_arguments(change, error, words):
    args = _op_args(**change)
    with pytest.raises(error, match=words):
        torch.ops.facekernels.margin_lse(**args)
    batch = args["embeddings"].shape[0] if args["embeddings"].dim() == 2 else 6
    grads = dict(grad_rows=torch.ones(batch), dphi=torch.ones(batch), lse=torch.zeros(batch),
                 need_embeddings_grad=True, need_weight_grad=True)  # fmt: skip
    with pytest.raises(error, match=words):
        torch.ops.facekernels.margin_backward(**grads, **args)


@pytest.mark.parametrize("negatives, cos_bound, filter_threshold, subcenters",
                         [(0, 1.0, math.inf, 1), (1, 1.0, math.inf, 1), (2, 1.0, math.inf, 1), (0, 0.999, 0.3, 3)])
def test_opcheck(negatives, cos_bound, filter_threshold, subcenters):
    # schemas, fake kernels (facekernels/_library.py) and their use by torch.compile's tracing
    ops = _extension.ops()
    args = _op_args(9, 21, 6, negatives=negatives, subcenters=subcenters, cos_bound=cos_bound,
                    filter_threshold=filter_threshold)  # fmt: skip
    torch.library.opcheck(ops.margin_lse.default, tuple(args.values()) + (8,))
    lse = ops.margin_lse(**args)[0]
    a = args
    grad_args = (torch.randn(9), a["embeddings"], a["weight"], a["inv_x"], a["inv_w"], a["target"], a["phi"],
                 torch.rand(9), a["tau"], a["t"], lse, 64.0, negatives, 0.2, cos_bound, filter_threshold, subcenters)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.margin_backward.default, grad_args + need + (8,))
    torch.library.opcheck(ops.inv_norms.default, (args["weight"],))


def test_inv_norms_do_not_overflow_and_keep_nan():
    rows = torch.randn(5, 7)
    rows[1] *= 1e20  # a float32 sum of squares would be inf, the inverse norm 0: a zero vector
    rows[2] = 0.0
    rows[3, 4] = float("nan")
    got = _extension.ops().inv_norms(rows)
    want = 1 / rows.double().norm(dim=1).clamp_min(1e-12)
    kit.assert_close(got[[0, 1, 2, 4]], want[[0, 1, 2, 4]], rtol=1e-6, atol=0, what="inverse norms")
    assert torch.isnan(got[3])
    half = _extension.ops().inv_norms(torch.full((2, 3), 6e4, dtype=torch.float16))  # norm > float16's max
    kit.assert_close(half, torch.full((2,), 1 / (6e4 * 3**0.5)), rtol=1e-3, atol=0, what="float16 rows")


def test_missing_extension_gives_the_build_hint():
    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'facekernels._C':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import facekernels as fk\n"
        "try:\n"
        "    fk.ArcFace(4, 3, backend='cpu')(torch.randn(2, 4), torch.tensor([0, 2]))\n"
        "except fk.ExtensionUnavailableError as e:\n"
        "    assert 'pip install --no-build-isolation -e .' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ExtensionUnavailableError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


_RSS_SCRIPT = r"""
import sys, torch
import facekernels as fk
from facekernels._backends import head_loss

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

torch.manual_seed(0)
backend = sys.argv[1]
batch, classes, features = 512, 100_000, 8
x = torch.randn(batch, features, requires_grad=True)
w = torch.randn(classes, features, requires_grad=True)
y = torch.randint(0, classes, (batch,))
t = torch.zeros(())
params = fk.head_params("curricular")
fn = lambda *a: head_loss(*a, backend)
fn(x[:2], w[:50], y[:2] % 50, params, t, True).backward()  # load the extension, warm the allocator
x.grad = w.grad = None
# VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss; clear_refs 5 resets VmHWM to VmRSS
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
fn(x, w, y, params, t, True).backward()
print((status_kib("VmHWM") - before) / 1024)
"""


def _peak_rss_delta_mib(backend):
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, backend], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.slow
def test_no_batch_by_classes_buffer_peak_rss():
    # (B, C) float32 here is 512 * 100000 * 4 B = 195 MiB, while everything the fused op may allocate (blocks
    # of (B, 1024) per thread, w tiles, x_hat, dW: 3 MiB) stays far below 49 MiB: any materialised
    # logits, cosines or softmax, in C++ or Python, shows in the process's RSS high-water mark.
    logits_mib = 512 * 100_000 * 4 / 2**20
    cpu = _peak_rss_delta_mib("cpu")
    assert cpu < logits_mib / 4, f"cpu backend peak RSS grew by {cpu:.0f} MiB (logits: {logits_mib:.0f} MiB)"
    eager = _peak_rss_delta_mib("reference")  # the check can fail: the eager head does trip it
    assert eager > logits_mib, eager


_HEAD_MATH_CU = r"""
#include "facekernels/head_math.h"
__global__ void head_math_kernel(const float* c, float* out, facekernels::NegativeMath p, float t) {
  const int i = threadIdx.x;
  const auto negative = facekernels::negative_logit(c[i], 0.1f, t, p);
  out[i] = negative.value + negative.derivative + facekernels::clamp_cosine(c[i], 0.999f) +
           facekernels::inside_bound(c[i], 0.999f) + facekernels::max_keep_nan(c[i], t) +
           facekernels::subcenter_max(c, 3).raw;
}
"""


@pytest.mark.slow
def test_head_math_header_compiles_with_plain_nvcc(tmp_path):
    # the header is for CUDA kernels too: no torch include, every function __host__ __device__
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the plain-nvcc compile check needs the CUDA toolkit")
    src = tmp_path / "head_math_check.cu"
    src.write_text(_HEAD_MATH_CU)
    cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc", "include"), str(src),
           "-o", str(tmp_path / "head_math_check.o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(ROOT, "csrc", "include", "facekernels", "head_math.h")) as f:
        text = f.read()
    assert "torch/" not in text and "ATen/" not in text
