"""Build of facekernels and its compiled extension facekernels._C.

Install against the torch you already have: ``pip install --no-build-isolation -e .`` (build isolation
would fetch a second, multi-GB torch). Every build choice is an environment variable:

FACEKERNELS_CUDA        "auto" (default): build the CUDA kernels when torch is a CUDA build and nvcc is
                        found; "1": require them (fail otherwise); "0": CPU only.
FACEKERNELS_CUDA_ARCHS  semicolon-separated SM versions, default "90" (H100/H200); PTX of the highest
                        is embedded too, so newer GPUs JIT it.
FACEKERNELS_NO_EXT      "1": skip the compiled extension altogether (pure-Python install).
FACEKERNELS_OPENMP      "auto" (default): compile with -fopenmp when the C++ compiler takes it (a test compile;
                        Apple clang does not); "1": require it; "0": without (the CPU kernels run serially).
MAX_JOBS                parallel compile jobs; default min(cores, GiB of memory / 4), at least 1.
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """facekernels compiles its C++ extension against the torch you run, and torch is not importable here.
Install torch first (a CPU or CUDA build of your choice), then this package without build isolation, which
would hide that torch from the build:
    python -m pip install torch
    python -m pip install --no-build-isolation .
(FACEKERNELS_NO_EXT=1 installs the pure-Python package, reference backend only.)"""


def _version() -> str:
    # the one place the version is written is facekernels/__init__.py; importing it here would need torch
    with open(os.path.join(ROOT, "facekernels", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


def _default_jobs() -> int:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gib // 4)))


def _want_cuda(torch_is_cuda: bool, have_nvcc: bool) -> bool:
    choice = os.environ.get("FACEKERNELS_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"FACEKERNELS_CUDA must be auto, 0 or 1; got {choice!r}")
    if choice == "0":
        return False
    if choice == "1":
        if not (torch_is_cuda and have_nvcc):
            raise SystemExit(
                "FACEKERNELS_CUDA=1 needs a CUDA build of torch and nvcc; "
                f"torch CUDA: {torch_is_cuda}, nvcc found: {have_nvcc}"
            )
        return True
    return torch_is_cuda and have_nvcc


def _arch_flags() -> list:
    archs = [a.strip() for a in os.environ.get("FACEKERNELS_CUDA_ARCHS", "90").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"FACEKERNELS_CUDA_ARCHS must be like '90' or '80;90'; got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{top},code=compute_{top}"]


def _compiler_takes_openmp() -> bool:
    """Whether the C++ compiler of this build compiles and links a tiny OpenMP program with -fopenmp."""
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            done = subprocess.run([*cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")], capture_output=True)
        except OSError:
            return False
        return done.returncode == 0


def _openmp_flags() -> list:
    # at::parallel_for (the CPU kernels' threads) is inline code that uses OpenMP only when compiled with
    # it; without, the kernels are correct but serial
    choice = os.environ.get("FACEKERNELS_OPENMP", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"FACEKERNELS_OPENMP must be auto, 0 or 1; got {choice!r}")
    if choice == "0":
        return []
    if _compiler_takes_openmp():
        return ["-fopenmp"]
    if choice == "1":
        raise SystemExit("FACEKERNELS_OPENMP=1, but the C++ compiler does not take -fopenmp (set CXX; install libomp)")
    print("facekernels: the C++ compiler does not take -fopenmp (Apple clang?): the CPU kernels will run on one "
          "thread; set CXX to a compiler with OpenMP for threaded kernels", file=sys.stderr)  # fmt: skip
    return []


def _extensions():
    if os.environ.get("FACEKERNELS_NO_EXT") == "1":
        return [], {}
    try:
        import torch
    except ImportError as err:
        raise SystemExit(f"{NO_TORCH}\n(import torch: {err})") from None
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    have_nvcc = CUDA_HOME is not None and (shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")))  # fmt: skip
    with_cuda = _want_cuda(torch.version.cuda is not None, have_nvcc)

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    openmp = _openmp_flags()
    cxx = ["-O3", "-std=c++17", *openmp]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], extra_link_args=openmp)
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *_arch_flags()]
        ext = CUDAExtension(
            "facekernels._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFACEKERNELS_WITH_CUDA"], "nvcc": nvcc + ["-DFACEKERNELS_WITH_CUDA"]},
            **kwargs,
        )
    else:
        ext = CppExtension("facekernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="facekernels",
    version=_version(),
    description="Fused GPU kernels for face-recognition training: margin-softmax heads and triplet mining",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["facekernels", "facekernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is not pinned: install it first (a CPU or CUDA build of your choice), then this package
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.2", "pytorch-metric-learning"],
    },
    entry_points={"console_scripts": ["facekernels-bench = facekernels.benchmark.cli:main"]},
    zip_safe=False,
)
