"""The rough edges a new user hit (issue 25, item 4): attributes set after construction, mixed dtypes, the
README's install line and functional example, and facekernels-bench's legend and help."""

from __future__ import annotations

import datetime
import inspect
import os
import re
import tempfile

import kit
import pytest
import torch
import torch.distributed as dist

import facekernels as fk
from facekernels import _extension
from facekernels import functional as fkf
from facekernels.benchmark import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = kit.CPU_TENSOR_BACKENDS

HEADS = [fk.NormSoftmax, fk.ArcFace, fk.CosFace, fk.CombinedMargin, fk.MVSoftmax, fk.CurricularFace, fk.AdaFace,
         fk.MagFace, fk.ElasticArcFace, fk.ElasticCosFace, fk.SubCenterArcFace]  # fmt: skip
# a valid value other than the default, for every hyper-parameter of the constructors
OTHER = dict(s=24.0, m=0.3, easy_margin=True, fallback="facexzoo", interclass_filtering_threshold=0.3, m1=1.2,
             m2=0.3, m3=0.1, t=0.3, is_am=False, momentum=0.5, h=0.5, t_alpha=0.5, eps=0.01, l_a=5.0, u_a=50.0,
             l_m=0.3, u_m=0.7, lambda_g=10.0, kind="cos", std=0.1, plus=True)  # fmt: skip
OPTIONS = ("in_features", "num_classes", "reduction", "ignore_index", "margin_grad", "backend", "process_group",
           "sample_rate", "sample_seed", "generator", "k")  # fmt: skip


def _margins(cls):
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self" and n not in OPTIONS]


# names whose effect these eval-mode inputs need not show (a draw, an update, a branch some rows may not take):
# for them the test checks the params, which differ from the default's
EVAL_SILENT = {"std", "plus", "momentum", "t_alpha", "fallback", "easy_margin"}


def _loss_and_grad(head, x, y):
    x = x.clone().requires_grad_()
    loss = head(x, y)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_every_hyper_parameter_set_after_construction_takes_effect(cls):
    """head.<name> = value gives the head that the constructor builds with that value: the same params, loss
    and gradient (eval mode: no t / statistics update, no draw); and it changes them (with this issue's
    `head.reduction = "none"` first of all)."""
    x, w, y = kit.head_inputs(9, 7, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    k = 3 if cls is fk.SubCenterArcFace else 1
    w = w.repeat_interleave(k, dim=0) + 0.1 * torch.randn(7 * k, 5, generator=torch.Generator().manual_seed(2))
    for name in ["reduction", "ignore_index", "margin_grad"] + _margins(cls):
        value = {"reduction": "none", "ignore_index": 3, "margin_grad": "straight_through"}.get(name, OTHER.get(name))
        if cls is fk.MagFace and name == "easy_margin":
            value = False
        base = {"is_am": False} if cls is fk.MVSoftmax and name == "fallback" else {}  # Arc variant only
        head = cls(5, 7, backend="reference", **base).eval()
        fresh = cls(5, 7, backend="reference", **{**base, name: value}).eval()
        for h in (head, fresh):
            h.weight.data.copy_(w)
        default = head.params
        before = _loss_and_grad(head, x, y)
        setattr(head, name, value)
        assert getattr(head, name) == value, name
        assert head.params == fresh.params != default, (cls.__name__, name)
        got, want = _loss_and_grad(head, x, y), _loss_and_grad(fresh, x, y)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (cls.__name__, name)
        # a cosine margin's exact derivative is 1: straight-through is the same gradient there
        cos_margin = cls is fk.ElasticCosFace or (default.m1 == 1 and default.m2 == 0 and default.row_margins is None)
        linear = name == "margin_grad" and cos_margin
        if name not in EVAL_SILENT and not linear:
            changed = before[0].shape != got[0].shape or not all(torch.equal(a, b) for a, b in zip(before, got))
            assert changed, f"{cls.__name__}.{name} changed nothing"


def test_bad_or_fixed_attributes_raise_and_change_nothing():
    head = fk.ArcFace(5, 7)
    params = head.params
    for name, value, error in (("reduction", "avg", ValueError), ("s", -1.0, ValueError), ("m", "0.5", TypeError),
                               ("margin_grad", "none", ValueError), ("backend", "gpu", ValueError),
                               ("return_stats", 1, TypeError), ("sample_rate", 0.5, ValueError),
                               ("fallback", "bogus", ValueError)):  # fmt: skip
        with pytest.raises(error, match=name):
            setattr(head, name, value)
        assert head.params is params
    for name in ("in_features", "num_classes", "process_group", "class_start", "num_local", "sample_seed"):
        with pytest.raises(AttributeError, match=name):
            setattr(head, name, 3)
    sub = fk.SubCenterArcFace(5, 7, k=3)
    with pytest.raises(AttributeError, match="k is fixed"):
        sub.k = 2
    assert sub.k == 3 and head.in_features == 5 and head.num_classes == 7
    head.return_stats = True
    assert isinstance(head(torch.randn(2, 5), torch.tensor([0, 1])), tuple)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_does_not_mix_with_lower_precisions(backend):
    """float64 with float64 only (TypeError otherwise); float16 / bfloat16 embeddings with a float32 weight run
    in float32, the gradient in each input's dtype: the same on every backend."""
    x, w, y = kit.head_inputs(6, 5, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    for xd, wd in ((torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.float16)):
        with pytest.raises(TypeError, match="both be float64 or neither"):
            fkf.margin_cross_entropy(x.to(xd), w.to(wd), y, "arcface", backend=backend)
    for low in (torch.float16, torch.bfloat16):
        xl = x.to(low).requires_grad_()
        wf = w.clone().requires_grad_()
        loss = fkf.margin_cross_entropy(xl, wf, y, "arcface", backend=backend)
        xf = xl.detach().float().requires_grad_()
        wf2 = w.clone().requires_grad_()
        want = fkf.margin_cross_entropy(xf, wf2, y, "arcface", backend=backend)
        loss.backward()
        want.backward()
        assert loss.dtype == torch.float32 and xl.grad.dtype == low and wf.grad.dtype == torch.float32
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(wf.grad, wf2.grad, rtol=1e-5, atol=1e-6)
    # the modules and the pytorch-metric-learning drop-in say the same
    with pytest.raises(TypeError, match="float64"):
        fk.CosFace(4, 5, backend=backend)(x.double(), y)
    from facekernels.compat.pml import CosFaceLoss

    with pytest.raises(TypeError, match="float64"):
        CosFaceLoss(5, 4, backend=backend)(x.double(), y)


@kit.needs_ext
def test_float64_mixed_raises_in_the_sharded_mode(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        head = fk.ArcFace(4, 5, process_group=dist.group.WORLD)
        with pytest.raises(TypeError, match="both be float64 or neither"):
            head(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))
        assert head(torch.randn(3, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2])).dtype == torch.float32
    finally:
        dist.destroy_process_group()


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_install_uses_the_cpu_wheel_index_and_keeps_the_local_command():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", _readme(), flags=re.S).group(1)
    first = [line for line in block.splitlines() if line.startswith("python3 -m pip install torch")]
    assert len(first) == 1, block
    # PyTorch's selector: the CPU-only index for torch alone (the other packages come from the plain index)
    assert "python3 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && " in first[0]
    assert "--no-build-isolation -e \".[bench,test]\"" in first[0] and first[0].endswith("facekernels-bench")
    after = _readme().split("## Two commands", 1)[1].split("## Use", 1)[0]
    assert "already installed" in after and "--find-links" in after  # the command where a CPU wheel is local


def test_readme_functional_example_says_it_updates_t():
    use = _readme().split("## Use", 1)[1]
    line = next(i for i, text in enumerate(use.splitlines()) if '"curricular", t=curricular.t' in text)
    note = "\n".join(use.splitlines()[line + 1 : line + 3])
    assert "training=True" in note and "eval" in note
    # and that is what the code does: t moves in the functional form of a head in eval mode
    head = fk.CurricularFace(4, 5).eval()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    fkf.margin_cross_entropy(x, head.weight, y, "curricular", t=head.t)
    assert head.t.item() != 0.0
    fkf.margin_cross_entropy(x, head.weight, y, "curricular", t=head.t, training=head.training)
    moved = head.t.item()
    fkf.margin_cross_entropy(x, head.weight, y, "curricular", t=head.t, training=False)
    assert head.t.item() == moved


def test_bench_prints_a_legend_and_lists_its_providers(capsys):
    for column in ("time / gemm", "memory / eager", "peak MiB", "speedup vs eager"):
        assert f'"{column}' in cli.LEGEND, column
    assert "weight.grad" in cli.LEGEND
    text = cli.parser().format_help()
    providers = re.search(r"\n  --providers PROVIDER.*?(?=\n  --)", text, flags=re.S).group(0)
    for name in ("cpu", "triton", "cuda", "eager", "compile", "gemm", "pml"):
        assert name in providers, name
    no_progress = re.search(r"\n  --no-progress.*?(?=\n  --|\Z)", text, flags=re.S).group(0)
    assert len(no_progress.split()) > 3, no_progress  # it has a help text
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--providers", "fused"])
    assert "invalid choice: 'fused'" in capsys.readouterr().err


def test_bench_run_prints_the_legend(tmp_path, capsys):
    code = cli.main(["--ops", "heads", "--classes", "50", "--batch", "4", "--features", "8", "--providers", "eager",
                     "gemm", "--repeats", "2", "--budget", "0.01", "--in-process", "--no-progress",
                     "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and cli.LEGEND in out and out.index(cli.LEGEND) > out.index("| provider |")


def test_examples_default_checkpoint_is_outside_the_working_directory():
    import runpy

    module = runpy.run_path(os.path.join(ROOT, "examples", "train_single.py"), run_name="not_main")
    assert module["DEFAULT_CHECKPOINT"].startswith(tempfile.gettempdir())
    args = module["parse_args"](["--resume"])
    assert args.resume == "" and module["parse_args"]([]).resume is None


def test_migration_guide_opens_with_the_swaps_and_says_what_the_code_does():
    """docs/migration.md (issue 21 item 9, issue 25): the one-line swaps first, the lines to change for the
    trainers whose heads return logits, and no statement the code contradicts."""
    with open(os.path.join(ROOT, "docs", "migration.md")) as f:
        text = f.read()
    first = text.split("\n## ", 2)[1]
    assert first.startswith("The one-line swaps")
    assert "from facekernels.compat.pml import ArcFaceLoss" in first
    assert "from facekernels.compat.insightface import PartialFC_V2, CombinedMarginLoss" in first
    lines = text.split("## Lines to change in the published training scripts", 1)[1].split("\n## ", 1)[0]
    for trainer in ("**CurricularFace**", "**FaceX-Zoo**", "**AdaFace**", "**MagFace**", "**ElasticFace**"):
        block = lines.split(trainer, 1)[1].split("```diff", 1)[1].split("```", 1)[0]
        assert block.count("\n-") >= 2 and block.count("\n+") >= 2, trainer
    assert "do not have this fallback" not in text and "is not available" not in text
    assert "needs\n  `labels.view(-1)`" not in text and "return_stats" in text
    # what the guide now says: (B, 1) int32 labels are taken as they are; the cpu kernels have FaceX-Zoo's fallback
    x, w, y = kit.head_inputs(8, 5, 4, generator=torch.Generator().manual_seed(4))
    x[:3] = -x[:3] * 5  # rows past theta + m > pi
    want = fkf.margin_cross_entropy(x, w, y, "arcface", m=0.35, fallback="facexzoo", backend="reference")
    for backend in ("reference",) + (("cpu",) if _extension.is_available() else ()):
        got = fkf.margin_cross_entropy(x, w, y.view(-1, 1).int(), "arcface", m=0.35, fallback="facexzoo",
                                       backend=backend)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
