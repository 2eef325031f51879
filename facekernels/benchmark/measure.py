"""Measurement: median time with 20/80 percentiles and peak memory of one step, OOM as a result.

Time: ``triton.testing.do_bench`` on GPU (it flushes L2 between runs); on CPU a perf_counter loop after
warm-up with the garbage collector off, several calls per sample when a call is short, and inputs rotated
over enough copies to overflow the last-level cache when one set would fit in it.

Peak memory: on GPU the ``max_memory_allocated`` rise over the memory held before the step. On CPU (median
and 20/80 percentiles of up to 3 calls) the rise
of the process's resident high-water mark (VmHWM) during the step, measured in a fresh spawned process per
(op, provider) whose HWM is reset to the current RSS before each step (``/proc/self/clear_refs``, Linux
>= 4.0) and whose malloc returns large blocks to the OS at once while memory is measured (``mallopt``), so
memory freed by an earlier size is neither counted nor silently reused. Where the HWM cannot be reset, each
(provider, shape) gets its own process and the rise over the HWM after setup is reported.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import time
import traceback
from dataclasses import dataclass

import torch

from .ops import UNAVAILABLE_ERRORS, GiB

MiB = 2**20
QUANTILES = (0.5, 0.2, 0.8)
DEADLINE = "skipped(deadline)"
CPU_SAMPLE_S = 0.005  # a CPU time sample spans at least this long (calls are batched below it)


@dataclass
class Outcome:
    """What one (op, provider, shape, mode) gave: (p50, p20, p80) or a status string per metric."""

    time_ms: tuple | str
    memory_mib: tuple | str
    note: str = ""


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def quantiles(samples: list) -> tuple:
    """(p50, p20, p80) of the samples, linearly interpolated (as torch.quantile)."""
    s = sorted(samples)

    def q(p):
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return tuple(q(p) for p in QUANTILES)


def time_cpu(step, repeats: int, budget_s: float, min_repeats: int = 5, once: float | None = None) -> tuple:
    """(p50, p20, p80) milliseconds of an already warmed-up step; ``once``: seconds of one call if known. At least
    ``min_repeats`` samples whatever the budget, but never more than ``repeats`` (``--repeats 1``: one sample, for
    the scale run's minute-long steps)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if once is None:
            start = time.perf_counter()
            step()
            once = time.perf_counter() - start
        inner = max(1, math.ceil(CPU_SAMPLE_S / max(once, 1e-9)))
        n = min(repeats, max(min_repeats, int(budget_s / max(once * inner, 1e-9))))
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            for _ in range(inner):
                step()
            samples.append((time.perf_counter() - start) * 1e3 / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return quantiles(samples)


def time_gpu(step) -> tuple:
    from triton.testing import do_bench

    return tuple(do_bench(step, quantiles=list(QUANTILES)))


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (32 MiB when sysfs does not say)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 * MiB


def rotation_copies(input_bytes: int, device: torch.device, max_copies: int = 8) -> int:
    """Input sets to rotate so that the timed loop does not run from a warm cache (CPU; do_bench flushes
    the GPU's L2 itself)."""
    if device.type != "cpu":
        return 1
    target = 2 * last_level_cache_bytes()
    return 1 if input_bytes >= target else min(max_copies, math.ceil(target / max(input_bytes, 1)))


# ---- CPU resident-memory high-water mark --------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_resettable() -> bool:
    try:
        return reset_hwm() and _status_kib("VmHWM") > 0
    except OSError:
        return False


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def set_malloc_for(phase: str) -> None:
    """glibc malloc tuned per phase. "memory": blocks from 1 MiB up are mmapped and unmapped on free, and
    free heap pages are returned first, so the RSS follows what the step holds. "time": the mmap threshold
    glibc's dynamic rule settles at in a training loop (32 MiB), so the timing is not of page faults that a
    steady-state run would not take. (Either call fixes the threshold: glibc stops adjusting it.)"""
    libc = _libc()
    if libc is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = 1 << 20 if phase == "memory" else 32 << 20
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)
    if phase == "memory":
        libc.malloc_trim(0)


def peak_memory_mib(step, device: torch.device) -> tuple[float, str, float]:
    """Peak memory the step adds over what is held before it (MiB), a note on how it was read, and the
    seconds the call took (the CPU timer's calibration)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB, "", time.perf_counter() - start
    gc.collect()
    set_malloc_for("memory")
    if reset_hwm():
        before, note = _status_kib("VmRSS"), ""
    else:
        before, note = _status_kib("VmHWM"), "HWM not resettable: rise over the HWM after setup"
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = max(0, _status_kib("VmHWM") - before) / 1024
    set_malloc_for("time")
    return peak, note, seconds


# ---- one case ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    repeats: int = 100  # the most timed samples per case
    budget_s: float = 0.5  # time spent sampling per case on CPU (at least 5 samples, or --repeats if fewer)
    mem_limit_gib: float = 16.0  # CPU: a case estimated above this is recorded as skipped, not run
    measure_memory: bool = True
    threads: int | None = None  # CPU: torch.set_num_threads in the measuring process (None: torch's default)


def _release(device: torch.device) -> None:
    """Hand freed memory back (tensors go by reference counting; a full gc costs 0.2 s, only on GPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def measure(op, provider: str, shape, mode: str, device: torch.device, settings: Settings) -> Outcome:
    """Time and peak memory of one case; unavailability, OOM and errors become the outcome, not a raise."""
    if device.type == "cpu":
        need = op.estimate_bytes(provider, shape, mode)
        if need > settings.mem_limit_gib * GiB:
            status = f"OOM(skipped: needs {need / GiB:.1f} GiB > limit {settings.mem_limit_gib:g} GiB)"
            return Outcome(status, status)
    memory, time_ms, note = "not measured", None, ""
    step = None
    try:
        step = op.setup(provider, shape, mode, device)
        compile_s = getattr(step, "compile_s", None)
        if compile_s is not None:  # setup has run the step once (compiling it)
            note = f"first call (compiling unless cached) {compile_s:.1f} s, not timed"
        else:
            step()  # warm-up: one-time allocations (thread pools, library workspaces) are not the op's
        once = None  # seconds of one call: the CPU timer's calibration
        if settings.measure_memory:
            # the CPU high-water mark of one call varies by tens of percent at small sizes (seen: 105 to
            # 164 MiB for eager heads at C = 10k): up to 3 calls while they stay within the time budget
            peaks, spent = [], 0.0
            while len(peaks) < (3 if device.type == "cpu" else 1) and (not peaks or spent < settings.budget_s):
                peak, mem_note, once = peak_memory_mib(step, device)
                peaks.append(peak)
                spent += once
            memory = quantiles(peaks)
            note = "; ".join(n for n in (note, mem_note) if n)
        copies = rotation_copies(op.input_bytes(shape), device)
        if copies > 1:
            step = None
            step = op.setup(provider, shape, mode, device, copies=copies)
            once = None
            if not hasattr(step, "compile_s"):
                step()  # (a compile step has run once in setup)
        if device.type == "cuda":
            time_ms = time_gpu(step)
        else:
            time_ms = time_cpu(step, settings.repeats, settings.budget_s, once=once)
    except UNAVAILABLE_ERRORS as err:
        return Outcome("unavailable", "unavailable", f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - every failure is a recorded result, the sweep goes on
        status = "OOM" if is_oom(err) else "error"
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if status == "error":
            detail += " | " + "".join(traceback.format_exception_only(type(err), err)).strip()[:300]
        if memory == "not measured" or not settings.measure_memory:
            memory = status
        return Outcome(time_ms if time_ms is not None else status, memory, "; ".join(n for n in (note, detail) if n))
    finally:
        step = None
        _release(device)
    return Outcome(time_ms, memory, note)


def group_key(op, shape, mode: str):
    """Shapes that differ only in the swept size x: once one OOMs, the larger ones are not attempted."""
    return (op.kernel(shape), shape.dtype, mode, tuple(sorted(op.config(shape).items())))


def run_shapes(op, provider: str, cases: list, device: torch.device, settings: Settings, deadline=None):
    """Yield (index, Outcome) for each (shape, mode) of ``cases`` in order, skipping sizes above an OOM
    and, past ``deadline`` (time.monotonic()), everything."""
    oom_at = {}
    for index, (shape, mode) in enumerate(cases):
        if deadline is not None and time.monotonic() >= deadline:
            yield index, Outcome(DEADLINE, DEADLINE)
            continue
        key, x = group_key(op, shape, mode), op.x_value(shape)
        if key in oom_at and x > oom_at[key]:
            status = f"OOM(skipped: OOM at {op.x_name}={oom_at[key]})"
            yield index, Outcome(status, status)
            continue
        outcome = measure(op, provider, shape, mode, device, settings)
        if any(isinstance(v, str) and v.startswith("OOM") for v in (outcome.time_ms, outcome.memory_mib)):
            oom_at[key] = min(x, oom_at.get(key, x))
        yield index, outcome


# ---- the spawned child: a fresh process per (op, provider) ---------------------------------------------


def child_main(conn, op_ref: tuple, provider: str, cases: list, device: str, settings: Settings) -> None:
    """Entry point of a spawned measurement process: sends ("start", i) and ("done", i, Outcome)."""
    import importlib

    module, qualname = op_ref
    op = importlib.import_module(module)
    for part in qualname.split("."):
        op = getattr(op, part)
    op = op() if isinstance(op, type) else op
    torch.manual_seed(0)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        for index, outcome in run_shapes(op, provider, cases, torch.device(device), settings):
            conn.send(("done", index, outcome))
    finally:
        conn.close()


def op_ref(op) -> tuple:
    """An importable (module, name) for an op object, so a spawned child can rebuild it."""
    cls = type(op)
    return cls.__module__, cls.__qualname__


def run_in_child(op, provider, cases, device, settings, timeout_s: float, deadline: float | None = None):
    """Yield (index, Outcome) for each case, measured in fresh spawned processes.

    A child that dies (killed by the kernel's OOM killer, or crashes) or runs past ``timeout_s`` (e.g. a
    compilation that does not end) costs only the case it was on; the rest go to a new child. Past
    ``deadline`` (time.monotonic()) the child is stopped and the cases left are recorded as skipped."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    remaining = list(range(len(cases)))
    per_shape = not hwm_resettable()
    while remaining:
        if deadline is not None and time.monotonic() >= deadline:
            for i in remaining:
                yield i, Outcome(DEADLINE, DEADLINE)
            return
        batch = remaining[:1] if per_shape else remaining
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=child_main,
            args=(child_conn, op_ref(op), provider, [cases[i] for i in batch], str(device), settings),
            daemon=True,
        )
        proc.start()
        child_conn.close()
        done = 0
        case_deadline = time.monotonic() + timeout_s
        while done < len(batch):
            wait_until = case_deadline if deadline is None else min(case_deadline, deadline)
            if not parent_conn.poll(max(0.0, wait_until - time.monotonic())):
                proc.kill()
                proc.join()
                if wait_until == case_deadline:
                    yield batch[done], Outcome("TIMEOUT", "TIMEOUT", f"no result within {timeout_s:g} s")
                    done += 1
                break
            try:
                _, local_index, outcome = parent_conn.recv()
            except EOFError:
                proc.join()
                code = proc.exitcode
                status = "OOM(killed)" if code == -9 else "error"
                yield batch[done], Outcome(status, status, f"measurement process exited with code {code}")
                done += 1
                break
            yield batch[local_index], outcome
            done += 1
            case_deadline = time.monotonic() + timeout_s
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
        remaining = [i for i in remaining if i not in batch[:done]]

