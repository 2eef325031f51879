"""The compiled extension: lazy loading, the first registered op against the reference, and the CUDA
kernel files compiling with plain nvcc (no torch headers)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from facekernels import _extension

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
    for op in ("inv_norms", "margin_lse", "margin_backward", "triplet_reduce", "triplet_terms"):
        assert hasattr(torch.ops.facekernels, op), op


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


@pytest.mark.slow
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


def test_argument_checks_build_their_messages_without_a_stream():
    # TORCH_CHECK_* stream their message arguments (c10::str), which segfaulted for numbers in the H200 machine's
    # CUDA build; every check goes through FK_CHECK_* (csrc/include/facekernels/check_message.h)
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    streamed = [f"{os.path.relpath(p, ROOT)}:{n}" for p in sources if not p.endswith("check_message.h")
                for n, line in enumerate(open(p), 1) if "TORCH_CHECK" in line]  # fmt: skip
    assert not streamed, streamed


def test_there_are_cuda_kernel_files():
    assert CU_FILES, "csrc/cuda/ must hold the CUDA kernels"


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
@pytest.mark.slow
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
