"""examples/train_single.py runs on tiny sizes, learns, and a run resumed from its mid-run checkpoint ends with
the uninterrupted run's loss, bit for bit (CPU, the same machine and thread count: every batch comes from a
generator seeded by its step, and the checkpoint holds the backbone, the head with t and its generator state,
the optimizer and the scheduler)."""

import os
import re
import subprocess
import sys

import kit
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_single.py")
TINY = ["--batch", "16", "--classes", "30", "--in-features", "16", "--embedding", "8", "--warmup", "2"]

pytestmark = [kit.needs_ext,
              pytest.mark.slow]  # runs the example scripts (torchrun)


def run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, SCRIPT, *TINY, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def final_loss(out):
    return re.search(r"^final loss (\S+)", out, flags=re.MULTILINE).group(1)  # float.hex(): exact


def test_it_learns(tmp_path):
    out = run(tmp_path, "--steps", "30", "--print-every", "30")
    losses = [float(v) for v in re.findall(r"^step +\d+  loss (\S+)", out, flags=re.MULTILINE)]
    assert len(losses) == 2 and losses[-1] < 0.7 * losses[0], out


@pytest.mark.parametrize("options", [["--head", "curricularface", "--amp", "--accum", "2"], ["--head", "arcface"]],
                         ids=["curricularface-amp-accum", "arcface"])  # fmt: skip
def test_resume_matches_the_uninterrupted_run(tmp_path, options):
    steps = ["--steps", "8"]
    whole = run(tmp_path, *steps, *options)
    first = run(tmp_path, *steps, *options, "--save-at", "3", "--stop-at", "3", "--checkpoint", "ck.pt")
    assert "stopped after step 3" in first and (tmp_path / "ck.pt").exists()
    resumed = run(tmp_path, *steps, *options, "--resume", "ck.pt")
    assert "resumed from ck.pt after step 3" in resumed
    assert final_loss(resumed) == final_loss(whole)
    assert final_loss(first) != final_loss(whole)  # the interrupted run did stop early


def test_bare_resume_continues_from_the_default_checkpoint_outside_the_working_directory(tmp_path):
    """README's `--save-at N --stop-at N` then `--resume` (no path): the checkpoint goes to the temporary folder
    (TMPDIR here), nothing is written into the working directory, and the resumed run matches the whole one."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TMPDIR": str(tmp)}

    def go(*args):
        done = subprocess.run([sys.executable, SCRIPT, *TINY, "--steps", "6", "--head", "arcface", *args], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    whole = go()
    go("--save-at", "2", "--stop-at", "2")
    assert list(work.iterdir()) == [] and (tmp / "facekernels" / "train_single_checkpoint.pt").exists()
    resumed = go("--resume")
    assert "after step 2" in resumed and final_loss(resumed) == final_loss(whole)
    assert list(work.iterdir()) == []


SHARDED = os.path.join(ROOT, "examples", "train_sharded_toy.py")


def run_sharded(tmp_path, *args):
    """examples/train_sharded_toy.py under torchrun: 2 gloo processes on CPU."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SHARDED,
           "--batch", "8", "--classes", "29", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sharded_partial_fc_resume_matches_the_uninterrupted_run(tmp_path):
    # Partial FC (sample_rate 0.5): the resumed ranks must draw the same classes, so the sampling generator's
    # state travels in the head's state_dict; without it the final losses would differ
    options = ["--steps", "6", "--sample-rate", "0.5"]
    whole = run_sharded(tmp_path, *options)
    first = run_sharded(tmp_path, *options, "--save-at", "2", "--stop-at", "2", "--checkpoint", "ck")
    assert "stopped after step 2" in first and (tmp_path / "ck.rank1.pt").exists()
    resumed = run_sharded(tmp_path, *options, "--resume", "ck")
    assert "resumed from ck after step 2" in resumed
    assert final_loss(resumed) == final_loss(whole)
    assert final_loss(first) != final_loss(whole)
