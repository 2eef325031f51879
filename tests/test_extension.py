"""The compiled extension: lazy loading, the first registered op against the reference, and the CUDA
kernel files compiling with plain nvcc (no torch headers)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import kit
import pytest
import torch

from facekernels import _extension
from facekernels.reference import clamp_cosine, normalize_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_needs_no_extension_no_cuda_no_triton():
    # a fresh interpreter in which facekernels._C and triton cannot be imported
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('facekernels._C', 'triton') or name.startswith('triton.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import facekernels, torch\n"
        "assert 'facekernels._C' not in sys.modules and 'triton' not in sys.modules\n"
        "head = facekernels.ArcFace(4, 3, backend='reference')\n"
        "head(torch.randn(2, 4), torch.tensor([0, 2])).backward()\n"
        "from facekernels import _extension\n"
        "assert not _extension.is_available()\n"
        "try:\n"
        "    _extension.ops()\n"
        "except facekernels.ExtensionUnavailableError as e:\n"
        "    assert 'pip install --no-build-isolation -e .' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ExtensionUnavailableError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_extension_is_built_and_registers_its_ops():
    assert _extension.is_available(), "facekernels._C is not built: run `pip install --no-build-isolation -e .`"
    assert hasattr(torch.ops.facekernels, "target_cosine")


def _target_cosine_oracle(x, w, labels, class_start):
    x_hat, w_hat = normalize_rows(x.double()), normalize_rows(w.double())
    j = labels - class_start
    owned = (j >= 0) & (j < w.shape[0])
    c = clamp_cosine((x_hat * w_hat[torch.where(owned, j, 0)]).sum(1))
    return torch.where(owned, c, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("class_start", [0, 5])
def test_target_cosine_matches_reference(device, dtype, class_start):
    if device == "cuda" and not _extension.cuda_built():
        pytest.fail("a CUDA device is present but facekernels._C was built without CUDA")
    batch, classes, features = 37, 13, 130
    x, w, y = kit.head_inputs(batch, classes, features, dtype=dtype)  # half the rows near their class
    x, w = x.to(device), w.to(device)
    labels = (y + class_start).to(device)
    labels[::3] = torch.randint(-2, classes + class_start + 3, (len(labels[::3]),))  # some on no shard
    labels[3] = -100
    labels[4] = class_start  # an owned row and an equal-to-its-weight row (c = 1)
    x[4] = w[0] * 2
    got = _extension.target_cosine(x, w, labels, class_start)
    want = _target_cosine_oracle(x, w, labels, class_start)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}[dtype]
    # the oracle reads the same rounded inputs, so only accumulation error remains
    kit.assert_close(got, want, rtol=0, atol=tol, what="target cosine")
    assert torch.all(got.cpu()[(labels.cpu() - class_start < 0) | (labels.cpu() - class_start >= classes)] == 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_target_cosine_keeps_nan(device, dtype):
    # a NaN / Inf row (or class weight) must give a NaN cosine, as the reference does: clamping it into
    # [-1, 1] turned NaN into -1, which the sharded CurricularFace t then took in as a valid cosine
    if device == "cuda" and not _extension.cuda_built():
        pytest.fail("a CUDA device is present but facekernels._C was built without CUDA")
    x, w, y = kit.head_inputs(11, 5, 33, dtype=dtype)
    x[2, 7] = float("nan")
    x[4, 0] = float("inf")
    w[y[6]] = float("nan")  # a NaN class: every row of that class
    x, w, y = x.to(device), w.to(device), y.to(device)
    got = _extension.target_cosine(x, w, y, 0)
    want = _target_cosine_oracle(x, w, y, 0)
    bad = torch.zeros(11, dtype=torch.bool)
    bad[[2, 4]] = True
    bad |= (y == y[6]).cpu()
    assert torch.isnan(want.cpu()[bad]).all() and torch.isfinite(want.cpu()[~bad]).all()
    kit.assert_close(got, want, rtol=0, atol=1e-6, equal_nan=True, what="target cosine")


def test_target_cosine_op_rejects_bad_arguments():
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    with pytest.raises(TypeError, match="one dtype"):
        _extension.target_cosine(x, w.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of features"):
        _extension.target_cosine(x, torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        _extension.target_cosine(x, w, torch.zeros(4, dtype=torch.int32))


def test_target_cosine_opcheck():
    x, w = torch.randn(9, 7), torch.randn(5, 7)
    labels = torch.randint(0, 5, (9,))
    torch.library.opcheck(torch.ops.facekernels.target_cosine.default, (x, w, labels, 0))


# ------------------------------------------------------------------------------------------- setup.py


def _setup(*args, env=None, hide_torch=False):
    """Run setup.py in a fresh interpreter (optionally one where `import torch` fails, as in pip's isolated
    build environment); returns the CompletedProcess."""
    shim = "import sys, runpy\n"
    if hide_torch:
        shim += "sys.modules['torch'] = None  # import torch raises ImportError\n"
    shim += f"sys.argv = ['setup.py', *{list(args)!r}]\nrunpy.run_path('setup.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", shim], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_setup_without_torch_says_what_to_do():
    # a plain `pip install .` builds in an isolated environment without torch: it died with a bare ImportError
    done = _setup("--version", hide_torch=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "Install torch first" in done.stderr and "pip install --no-build-isolation ." in done.stderr
    assert _setup("--version", env={"FACEKERNELS_NO_EXT": "1"}, hide_torch=True).returncode == 0


def test_setup_version_is_the_package_version():
    import facekernels

    done = _setup("--version", env={"FACEKERNELS_NO_EXT": "1"})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == facekernels.__version__
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert not re.search(r"version\s*=\s*[\"']", f.read()), "setup.py must read the version, not write it"


def test_setup_adds_fopenmp_only_where_the_compiler_takes_it(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    # a compiler that rejects -fopenmp as Apple clang does, and compiles everything else
    fake = tmp_path / "clang++"
    fake.write_text(f"""#!/bin/sh
for a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; }}; done
exec {cxx} "$@"
""")
    fake.chmod(0o755)
    warning = "does not take -fopenmp"
    assert warning not in _setup("--version", env={"CXX": cxx}).stderr
    done = _setup("--version", env={"CXX": str(fake)})
    assert done.returncode == 0 and warning in done.stderr
    done = _setup("--version", env={"CXX": str(fake), "FACEKERNELS_OPENMP": "1"})
    assert done.returncode != 0 and "FACEKERNELS_OPENMP=1" in done.stderr
    assert warning not in _setup("--version", env={"CXX": str(fake), "FACEKERNELS_OPENMP": "0"}).stderr


CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_kernel_files():
    assert CU_FILES, "csrc/cuda/ must hold the CUDA kernels"


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cuda_kernel_file_compiles_with_plain_nvcc(path, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the plain-nvcc compile check needs the CUDA toolkit")
    cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc", "include"), path,
           "-o", str(tmp_path / "kernel.o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # kernel files must not pull in torch: the glue (*_glue.cpp) does that, only against a CUDA torch
    with open(path) as f:
        text = f.read()
    assert "torch/" not in text and "ATen/" not in text
