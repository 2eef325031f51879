"""The benchmark harness itself: CSV schema, OOM and unavailability as results, provider selection, the
measurement (quantiles, rotation, memory in a child process), the GPU suite's plumbing and the CLI end to
end on tiny shapes. No timing assertions: only that what is measured is recorded the right way."""

import csv
import glob
import json
import os
import re
import signal
import sys
from dataclasses import dataclass

import kit
import pytest
import torch

from facekernels import ExtensionUnavailableError, _backends
from facekernels.benchmark import cli, gpu_suite, measure, render, results
from facekernels.benchmark.ops import OPS, HeadShape, TripletShape, _make_step

CPU = torch.device("cpu")
FAST = measure.Settings(repeats=5, budget_s=0.01, threads=1)


# ---- a fake op: sizes x, providers whose step allocates, fails or is unavailable on demand ----------------


@dataclass(frozen=True)
class FakeShape:
    x: int
    dtype: str = "float32"


class FakeOp:
    """Provider "alloc" allocates x MiB and touches it; "oom:<exc>" raises <exc> from x >= 20; "error" raises
    ValueError; "gone" raises ExtensionUnavailableError; "killed" dies by SIGKILL at x == 20."""

    name = "fake"
    x_name = "X"
    providers = ("alloc", "oom:torch", "oom:runtime", "oom:memory", "error", "gone", "killed")
    setups = []

    def kernel(self, shape):
        return "fake"

    def x_value(self, shape):
        return shape.x

    def config(self, shape):
        return {"k": 1}

    def default_providers(self, device):
        return ["alloc"]

    def input_bytes(self, shape):
        return 1 << 30  # no rotation

    def estimate_bytes(self, provider, shape, mode):
        return shape.x * 2**28 if provider == "alloc" else 0  # x / 4 GiB: big x is refused on CPU

    def probe(self, provider, device):
        return None

    def setup(self, provider, shape, mode, device, copies=1):
        FakeOp.setups.append((provider, shape.x))
        errors = {
            "oom:torch": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "oom:runtime": RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate "
                                        "memory: you tried to allocate 1 bytes. Error code 12 (out of memory)"),
            "oom:memory": MemoryError(),
        }  # fmt: skip

        def step():
            if provider == "alloc":
                torch.ones(shape.x * 2**18)  # x MiB of float32, written
            elif provider in errors and shape.x >= 20:
                raise errors[provider]
            elif provider == "error":
                raise ValueError("a bug in the provider")
            elif provider == "gone":
                raise ExtensionUnavailableError("facekernels._C is not built")
            elif provider == "killed" and shape.x == 20:
                os.kill(os.getpid(), signal.SIGKILL)

        return step


def fake_sweep(providers, xs, settings=FAST, **kw):
    cases = {("fake", p): [(FakeShape(x), "full") for x in xs] for p in providers}
    return cli.sweep(cases, CPU, settings, ops={"fake": FakeOp()}, in_process=True, progress=False, **kw)


def by_key(rows):
    return {(r["provider"], int(r["x_value"]), r["metric"]): r for r in rows}


# ---- CSV -------------------------------------------------------------------------------------------------


def test_csv_schema_rows_and_append(tmp_path):
    rows = fake_sweep(["alloc"], [1, 2])
    assert len(rows) == 4 and all(tuple(r) == results.SCHEMA for r in rows)
    path = tmp_path / "out" / "results.csv"
    results.append_csv(str(path), rows)
    results.append_csv(str(path), rows[:2])
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == results.SCHEMA and len(lines) == 1 + 6  # one header, rows appended
    back = results.read_csv(str(path))
    r = back[0]
    assert (r["kernel"], r["provider"], r["mode"], r["metric"], r["unit"]) == ("fake", "alloc", "full", "time", "ms")
    assert back[1]["metric"] == "memory" and back[1]["unit"] == "MiB"
    assert r["x_name"] == "X" and r["x_value"] == "1" and json.loads(r["config"]) == {"k": 1}
    p50, p20, p80 = (float(r[k]) for k in ("y_p50", "y_p20", "y_p80"))
    assert 0 < p20 <= p50 <= p80
    assert r["dtype"] == "float32" and r["torch_version"] == torch.__version__
    assert r["device"].startswith("CPU") and r["facekernels_commit"] and r["timestamp"].endswith("Z")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="schema"):
        results.append_csv(str(other), rows)


# ---- OOM, errors, unavailability -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["oom:torch", "oom:runtime", "oom:memory"])
@pytest.mark.slow
def test_oom_is_a_result_and_the_sweep_goes_on(provider):
    FakeOp.setups.clear()
    rows = by_key(fake_sweep([provider, "alloc"], [10, 20, 40]))
    assert float(rows[(provider, 10, "time")]["y_p50"]) > 0
    for metric in ("time", "memory"):
        assert rows[(provider, 20, metric)]["y_p50"] == "OOM"
        assert rows[(provider, 40, metric)]["y_p50"] == "OOM(skipped: OOM at X=20)"
    assert "out of memory" in rows[(provider, 20, "time")]["note"].lower() or provider == "oom:memory"
    assert (provider, 40) not in FakeOp.setups  # not attempted above the OOM size
    assert all(float(rows[("alloc", x, "time")]["y_p50"]) > 0 for x in (10, 20, 40))  # the next provider ran
    table = results.tables(list(rows.values()))
    assert "| 20 | " + provider + " | OOM |" in table


def test_cpu_memory_guard_skips_without_running():
    FakeOp.setups.clear()
    settings = measure.Settings(repeats=5, budget_s=0.01, mem_limit_gib=3, threads=1)
    rows = by_key(fake_sweep(["alloc"], [2, 16], settings))
    assert float(rows[("alloc", 2, "time")]["y_p50"]) > 0
    assert rows[("alloc", 16, "time")]["y_p50"] == "OOM(skipped: needs 4.0 GiB > limit 3 GiB)"
    assert FakeOp.setups == [("alloc", 2)]


def test_errors_and_unavailable_are_recorded_not_raised():
    rows = by_key(fake_sweep(["error", "gone", "alloc"], [1]))
    assert rows[("error", 1, "time")]["y_p50"] == "error"
    assert "a bug in the provider" in rows[("error", 1, "time")]["note"]
    assert rows[("gone", 1, "time")]["y_p50"] == rows[("gone", 1, "memory")]["y_p50"] == "unavailable"
    assert "ExtensionUnavailableError" in rows[("gone", 1, "time")]["note"]
    assert float(rows[("alloc", 1, "time")]["y_p50"]) > 0


def test_is_oom():
    assert measure.is_oom(torch.OutOfMemoryError("x")) and measure.is_oom(MemoryError())
    assert measure.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not measure.is_oom(RuntimeError("shape mismatch")) and not measure.is_oom(ValueError("out of memory"))


def test_deadline_skips_the_rest():
    rows = by_key(fake_sweep(["alloc"], [1, 2], deadline=0.0))
    assert rows[("alloc", 1, "time")]["y_p50"] == rows[("alloc", 2, "memory")]["y_p50"] == "skipped(deadline)"


# ---- providers -------------------------------------------------------------------------------------------


def test_default_providers_and_unknown_provider():
    assert OPS["heads"].default_providers(CPU) == ["cpu", "eager", "compile", "gemm"]
    assert OPS["heads"].default_providers(torch.device("cuda")) == ["triton", "eager", "compile", "gemm"]
    assert OPS["triplet"].default_providers(CPU) == ["cpu", "eager", "compile", "gemm", "pml"]
    assert OPS["triplet"].default_providers(torch.device("cuda"))[0] == "cuda"
    with pytest.raises(ValueError, match="unknown heads provider 'fused'"):
        OPS["heads"].probe("fused", CPU)
    with pytest.raises(ValueError, match="unknown triplet provider"):
        OPS["triplet"].setup("triton", TripletShape(8, 4, 2), "full", CPU)
    for op in OPS.values():
        assert op.probe("eager", CPU) is None and op.probe("gemm", CPU) is None
    assert "CUDA device" in OPS["heads"].probe("triton", CPU)  # never the Triton interpreter
    assert "CUDA" in OPS["triplet"].probe("cuda", CPU)


def test_missing_backend_is_listed_unavailable_not_substituted(monkeypatch):
    def missing_backend():
        import facekernels.no_such_backend  # noqa: F401

    monkeypatch.setitem(_backends._HEAD_KERNELS, "cpu", missing_backend)
    reason = OPS["heads"].probe("cpu", CPU)
    assert reason.startswith("BackendUnavailableError")
    cases = {("heads", "cpu"): [(HeadShape("arcface", 4, 8, 16), "full")]}
    rows = cli.sweep(cases, CPU, FAST, in_process=True, progress=False)
    assert [r["y_p50"] for r in rows] == ["unavailable", "unavailable"] and rows[0]["note"] == reason
    assert "| 16 | cpu | unavailable |" in results.tables(rows)


def test_extension_unavailable_is_listed_unavailable(monkeypatch):
    def not_built():  # what importing a compiled backend raises when facekernels._C is missing
        raise ExtensionUnavailableError("facekernels._C is not built")

    monkeypatch.setitem(_backends._TRIPLET_IMPLS, "cpu", not_built)
    assert OPS["triplet"].probe("cpu", CPU) == "ExtensionUnavailableError: facekernels._C is not built"


# ---- the steps -------------------------------------------------------------------------------------------


def test_make_step_rotates_input_sets_and_clears_grads():
    w = [torch.ones(3, requires_grad=True) for _ in range(3)]
    used = []

    def loss_fn(i):
        used.append(i)
        return (w[i] * 2).sum()

    step = _make_step(loss_fn, [[x] for x in w], "full", 3)
    for _ in range(7):
        step()
    assert used == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(w[0].grad, torch.full((3,), 2.0))  # cleared before each backward, not accumulated
    used.clear()
    step = _make_step(loss_fn, [[x] for x in w], "backward", 3)
    assert used == [0, 1, 2]  # backward mode: the losses are computed in setup
    for _ in range(4):
        step()
    assert used == [0, 1, 2] and torch.equal(w[1].grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_every_cpu_provider_runs_every_mode(mode):
    heads, triplet = OPS["heads"], OPS["triplet"]
    for provider in ("eager", "gemm"):
        for head in ("arcface", "curricular"):
            heads.setup(provider, HeadShape(head, 5, 7, 13), mode, CPU, copies=2)()
    for provider in ("eager", "gemm", "pml"):
        for mining in ("semihard", "hard"):
            triplet.setup(provider, TripletShape(12, 5, 3, mining), mode, CPU, copies=2)()


def test_optim_mode_steps_the_head_optimizer():
    """"optim": forward + backward + the head's SGD step for the fused head + torch.optim.SGD, the eager head
    + torch.optim.SGD and the fused update (fused_sgd); compile / gemm have no optim case."""
    import argparse

    from facekernels.benchmark.cli import build_cases

    heads = OPS["heads"]
    for provider in ("cpu", "eager", "fused_sgd"):
        step = heads.setup(provider, HeadShape("arcface", 5, 7, 13), "optim", CPU, copies=2)
        for _ in range(3):
            step()
    args = argparse.Namespace(ops=["heads"], providers=None, classes=[13], double_to=None, heads=["arcface"],
                              batch=5, features=7, dtype=["float32"], mode=["optim", "full"])  # fmt: skip
    cases = build_cases(args, CPU)
    assert {p for _, p in cases} == {"cpu", "eager", "compile", "gemm", "fused_sgd"}
    assert [m for _, m in cases[("heads", "fused_sgd")]] == ["optim"]
    assert [m for _, m in cases[("heads", "gemm")]] == ["full"]
    assert [m for _, m in cases[("heads", "cpu")]] == ["optim", "full"]


@pytest.mark.slow
def test_compile_provider_matches_eager():
    """torch.compile of the reference runs (compiled in setup, outside the timing) on CPU."""
    if OPS["heads"].probe("compile", CPU) is not None:
        pytest.skip(OPS["heads"].probe("compile", CPU))
    step = OPS["heads"].setup("compile", HeadShape("cosface", 5, 7, 13), "full", CPU)
    assert step.compile_s > 0
    step()


def test_eager_heads_step_gives_the_reference_gradients(monkeypatch):
    """The eager provider is the functional API with backend="reference" on random, non-zero inputs."""
    seen = []
    import facekernels.functional as fkf

    real = fkf.margin_cross_entropy

    def spy(x, w, y, head, **kw):
        seen.append((x, w, y, head, kw["backend"]))
        return real(x, w, y, head, **kw)

    monkeypatch.setattr(fkf, "margin_cross_entropy", spy)
    OPS["heads"].setup("eager", HeadShape("arcface", 5, 7, 13), "full", CPU)()
    (x, w, y, head, backend), = seen
    assert backend == "reference" and head == "arcface" and (x != 0).all() and (w != 0).all()
    assert x.grad is not None and w.grad is not None and x.grad.abs().sum() > 0


def test_memory_estimates_grow_with_the_swept_size():
    heads = OPS["heads"]
    small, big = HeadShape("arcface", 256, 512, 10_000), HeadShape("arcface", 256, 512, 100_000)
    assert heads.estimate_bytes("eager", big, "full") > 5 * heads.estimate_bytes("eager", small, "full")
    assert heads.estimate_bytes("eager", big, "full") > 12 * 256 * 100_000 * 4  # a dozen (B, C) matrices
    triplet = OPS["triplet"]
    assert triplet.estimate_bytes("pml", TripletShape(4096, 512, 4), "full") > 3 * 4096**3


# ---- measurement -----------------------------------------------------------------------------------------


def test_quantiles_match_torch_and_timer_orders_them():
    samples = torch.rand(37, dtype=torch.float64)
    expected = torch.quantile(samples, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    got = torch.tensor(measure.quantiles(samples.tolist()), dtype=torch.float64)
    kit.assert_close(got, expected, rtol=1e-12, atol=0, what="p50, p20, p80")
    calls = []
    p50, p20, p80 = measure.time_cpu(lambda: calls.append(1), repeats=7, budget_s=0.0)
    assert 0 < p20 <= p50 <= p80 and len(calls) >= 1 + 5  # one calibration call, at least 5 samples
    calls.clear()
    measure.time_cpu(lambda: calls.append(1), repeats=1, budget_s=10.0, once=1.0)  # --repeats caps the samples
    assert len(calls) == 1


def test_rotation_copies():
    llc = measure.last_level_cache_bytes()
    assert llc > 0
    assert measure.rotation_copies(2 * llc, CPU) == 1
    assert measure.rotation_copies(llc // 4, CPU) == 8
    assert measure.rotation_copies(1, torch.device("cuda")) == 1  # do_bench flushes the L2 itself


@pytest.mark.skipif(not measure.hwm_resettable(), reason="/proc/self/clear_refs is not writable here")
@pytest.mark.slow
def test_memory_in_a_child_process_and_a_killed_child():
    """The peak RSS rise of a step that writes x MiB is x MiB (one fresh process per provider); a child the
    kernel kills costs only its case, the next sizes run in a new child."""
    op, settings = FakeOp(), measure.Settings(repeats=5, budget_s=0.01, mem_limit_gib=1e6, threads=1)
    cases = [(FakeShape(x), "full") for x in (64, 160)]
    got = dict(measure.run_in_child(op, "alloc", cases, CPU, settings, timeout_s=120))
    for i, x in enumerate((64, 160)):
        assert got[i].memory_mib[1] <= got[i].memory_mib[0] <= got[i].memory_mib[2]
        assert isinstance(got[i].memory_mib, tuple), got[i]
        peak = got[i].memory_mib[0]
        assert x * 0.95 <= peak <= x * 1.05 + 4, (x, peak, got[i].note)
    cases = [(FakeShape(x), "full") for x in (10, 20, 30)]
    got = dict(measure.run_in_child(op, "killed", cases, CPU, FAST, timeout_s=120))
    assert got[1].time_ms == "OOM(killed)" and "-9" in got[1].note
    assert isinstance(got[0].time_ms, tuple) and isinstance(got[2].time_ms, tuple)


# ---- GPU suite, render, CLI ------------------------------------------------------------------------------


def test_gpu_suite_plan():
    groups = gpu_suite.plan(torch.device("cuda"), max_classes=10_000 * 2**12)
    keys = [k for k, _ in groups]
    # first every provider on the comparison shapes (the H200's first run timed no baseline: issue 20)
    assert keys[:9] == [("heads", p) for p in ("triton", "gemm", "compile", "eager")] + [
        ("triplet", p) for p in ("cuda", "gemm", "compile", "eager", "pml")]  # fmt: skip
    first = {s for _, items in groups[:4] for s, _ in items}
    assert first == {HeadShape(h, b, 512, 1_000_000, "bfloat16")
                     for h, b in (("arcface", 1024), ("curricular", 1024), ("arcface", 256))}  # fmt: skip
    assert keys[9:11] == [("heads", "triton"), ("triplet", "cuda")] and keys[-2:] == [("heads", "compile"),
                                                                                    ("triplet", "compile")]  # fmt: skip
    heads = groups[9][1]
    classes = [s.classes for s, _ in heads if s.dtype == "bfloat16" and s.head == "arcface"]
    assert classes[:3] == [10_000, 20_000, 40_000] and 30_000_000 in classes and classes[-1] == 40_960_000
    more = {(s.head, s.classes, s.dtype) for s, _ in heads if s.head != "arcface"}
    assert more == {(h, 1_000_000, "bfloat16") for h in ("adaface", "magface", "elastic_arcface", "subcenter_arcface")}
    assert classes == sorted(classes) and {s.dtype for s, _ in heads} == {"bfloat16", "float32"}
    assert all((s.batch, s.features) == (1024, 512) for s, _ in heads)
    triplets = dict(groups[9:])[("triplet", "pml")]  # the scale sweep's: B = 1024, K = 4 came first
    assert {(s.batch, s.per_class) for s, _ in triplets} == {(b, k) for b in (1024, 2048, 4096, 8192, 16384)
                                                            for k in (4, 40)} - {(1024, 4)}  # fmt: skip
    assert {k for k, _ in gpu_suite.plan(CPU, max_classes=1, quick=True, providers=["eager"])} == {
        ("heads", "eager"), ("triplet", "eager")}  # fmt: skip
    import datetime

    assert gpu_suite.result_dir("r", CPU, datetime.date(2026, 1, 2)) == os.path.join("r", "cpu-2026-01-02")
    assert gpu_suite.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_suite_runs_every_test_file_that_uses_the_gpu():
    # a file that puts tensors on kit.TRITON_DEVICE (or test_heads' DEVICE) or has gpu-marked tests
    here = os.path.dirname(os.path.abspath(__file__))
    uses_gpu = set()
    for path in set(glob.glob(os.path.join(here, "test_*.py"))) - {os.path.abspath(__file__)}:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if re.search(r"kit\.device\(|kit\.to_backend\(|TRITON_DEVICE|mark\.gpu|from test_heads import DEVICE", text):
            uses_gpu.add(os.path.basename(path))
    assert "test_heads.py" in uses_gpu and "test_heads_lowp.py" in uses_gpu  # the pattern still finds them
    assert uses_gpu <= set(gpu_suite.GPU_TESTS), sorted(uses_gpu - set(gpu_suite.GPU_TESTS))
    assert all(os.path.exists(os.path.join(here, f)) for f in gpu_suite.GPU_TESTS)


def test_gpu_suite_plumbing_on_cpu(tmp_path):
    """The suite's folder, env and outputs, with the build and tests skipped and a deadline already past."""
    out = tmp_path / "suite"
    code = cli.main(["--suite", "gpu", "--device", "cpu", "--quick", "--skip-build", "--skip-tests",
                     "--minutes", "0", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    assert {"env.txt", "results.csv", "table.md", "run.txt"} <= set(os.listdir(out))
    env = (out / "env.txt").read_text()
    assert "command: facekernels-bench --suite gpu" in env and "commit: " in env and "torch: " in env
    rows = results.read_csv(str(out / "results.csv"))
    assert rows and {r["y_p50"] for r in rows} == {"skipped(deadline)"}


def test_gpu_suite_logged_steps(tmp_path):
    """The build and test steps: output and exit code in the log, a step past its time limit is exit 124."""
    import sys

    log = tmp_path / "step.log"
    code = gpu_suite._run_logged([sys.executable, "-c", "print('built'); raise SystemExit(3)"], str(log))
    assert code == 3 and "built" in log.read_text() and "exit code 3" in log.read_text()
    code = gpu_suite._run_logged([sys.executable, "-c", "import time; time.sleep(30)"], str(log), timeout_s=0.5)
    assert code == 124 and "TIMEOUT after 0.5 s" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_refuses_without_cuda(tmp_path, capsys):
    assert cli.main(["--suite", "gpu", "--skip-build", "--out", str(tmp_path / "x")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_broken_fused_backend_is_an_error_per_case_not_unavailable(monkeypatch):
    class Broken:  # kernels whose every method fails
        def __getattr__(self, name):
            raise IndexError("kernel bug")

    monkeypatch.setitem(_backends._HEAD_KERNELS, "cpu", Broken)
    assert OPS["heads"].probe("cpu", CPU) is None
    rows = cli.sweep({("heads", "cpu"): [(HeadShape("arcface", 4, 8, 16), "full")]}, CPU, FAST, in_process=True,
                     progress=False)  # fmt: skip
    assert rows[0]["y_p50"] == "error" and "IndexError: kernel bug" in rows[0]["note"]


def test_render_and_readme_section(tmp_path):
    folder = tmp_path / "cpu-2026-01-02"
    folder.mkdir()
    results.append_csv(str(folder / "results.csv"), fake_sweep(["alloc", "oom:torch"], [10, 20]))
    (folder / "NOTES.md").write_text("CPU numbers.")
    (folder / "run.txt").write_text("command: facekernels-bench --x\ncommit: abc\nwall time: 9 s\n")
    text = render.render([str(folder)], str(tmp_path))
    assert "CPU numbers." in text and "`facekernels-bench --x` (commit `abc`" in text
    assert "| 20 | oom:torch | OOM |" in text and "commit `" in text
    readme = "# t\n\n## Results\n\nold\n\n## After\n\nkept\n"
    new = render.replace_section(readme, "## Results", text)
    assert "old" not in new and new.endswith("## After\n\nkept\n") and "CPU numbers." in new


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench"
    argv = ["--classes", "50", "70", "--batch", "9", "--features", "13", "--triplet-batch", "12", "20",
            "--providers", "cpu", "eager", "gemm", "pml", "--budget", "0.02", "--out", str(out), "--no-progress",
            "--in-process", "--threads", "1"]  # the spawned measurement process is tested above
    assert cli.main(argv) == 0
    rows = results.read_csv(str(out / "results.csv"))
    cases = {(r["kernel"], r["provider"], int(r["x_value"])) for r in rows}
    assert cases == {("arcface", p, c) for p in ("cpu", "eager", "gemm") for c in (50, 70)} | {
        ("triplet_semihard", p, b) for p in ("cpu", "eager", "gemm", "pml") for b in (12, 20)}  # fmt: skip
    measured = [r for r in rows if r["provider"] in ("eager", "gemm", "pml")]
    assert all(float(r["y_p50"]) >= 0 for r in measured)
    assert all(r["y_p50"] == "unavailable" or float(r["y_p50"]) >= 0 for r in rows if r["provider"] == "cpu")
    assert (out / "plot.png").stat().st_size > 1000 and "speedup vs eager" in (out / "table.md").read_text()
    assert "command: facekernels-bench --classes 50 70" in (out / "run.txt").read_text()
    assert "1 threads" in rows[0]["device"]


_TINY = ["--classes", "50", "--batch", "9", "--features", "13", "--triplet-batch", "12", "--providers", "eager",
         "--budget", "0.01", "--repeats", "5", "--no-progress", "--in-process", "--threads", "1"]  # fmt: skip


def test_cli_without_matplotlib_warns_up_front_and_skips_the_plot(tmp_path, monkeypatch, capsys):
    # it used to measure for minutes, write the CSV, then die at `import matplotlib`
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    measured = []
    real_sweep = cli.sweep

    def sweep(*args, **kwargs):
        measured.append(capsys.readouterr().err)  # what was said before the first measurement
        return real_sweep(*args, **kwargs)

    monkeypatch.setattr(cli, "sweep", sweep)
    out = tmp_path / "bench"
    assert cli.main([*_TINY, "--out", str(out)]) == 0
    assert "matplotlib is not installed" in measured[0] and "no plot" in measured[0]
    assert (out / "results.csv").exists() and (out / "table.md").exists() and not (out / "plot.png").exists()
    assert "plot in" not in capsys.readouterr().out


def test_gpu_suite_without_matplotlib_skips_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "suite"
    code = cli.main(["--suite", "gpu", "--device", "cpu", "--quick", "--skip-build", "--skip-tests",
                     "--minutes", "0", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and (out / "results.csv").exists() and not (out / "plot.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("load,warned", [(0.5, False), (1.0, False), (1.01, True), (7.0, True)])
def test_cli_warns_once_when_the_machine_is_loaded(tmp_path, monkeypatch, capsys, load, warned):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert cli.main([*_TINY, "--ops", "heads", "--out", str(tmp_path / "bench")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "load average" in line]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert f"load average {load:.2f}" in lines[0] and "2 cores" in lines[0]


def test_double_to_sweeps_classes_doubling_and_stops_each_provider_at_its_oom():
    args = cli.parser().parse_args(["--ops", "heads", "--classes", "1000", "--double-to", "9000",
                                    "--providers", "cpu", "eager"])  # fmt: skip
    cases = cli.build_cases(args, CPU)
    assert [s.classes for s, _ in cases[("heads", "cpu")]] == [1000, 2000, 4000, 8000]
    # the harness skips every size above a provider's first OOM (measure.run_shapes): the largest C it reached
    # is the last one measured
    args = cli.parser().parse_args(["--ops", "heads", "--classes", "1000", "30000", "--double-to", "4000"])
    assert [s.classes for s, _ in cli.build_cases(args, CPU)[("heads", "eager")]] == [1000, 2000, 4000, 30000]
