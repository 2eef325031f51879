"""The documentation users have: every argument of the public classes and functions is described in their
docstrings, the docs name only presets that exist, and nothing points to material outside the repository."""

import inspect
import os
import re
import textwrap

import pytest

import facekernels as fk
from facekernels import functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC = [*fk.heads.HEAD_CLASSES.values(), fk.TripletMarginLoss, fk.optim.SGD, fk.optim.AdamW]  # every head
FUNCTIONS = [functional.margin_cross_entropy, functional.triplet_margin_loss, fk.head_params,
             fk.ArcFace.like, fk.CurricularFace.frozen_t, fk.ArcFace.forward]  # fmt: skip
FUNCTIONS += [getattr(fk.convert, name) for name in dir(fk.convert) if name.startswith(("from_", "to_"))]
FUNCTIONS += [fk.convert.param_indices, fk.convert.transpose_optimizer_state]


def _documented(doc, name):
    return re.search(rf"^\s+\*{{0,2}}{name}:", doc, flags=re.MULTILINE) is not None


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_every_constructor_argument_is_in_the_class_docstring(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if not _documented(cls.__doc__, p)]
    assert not missing, f"{cls.__name__}: undocumented {missing}"


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__qualname__)
def test_every_function_argument_is_documented(fn):
    params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    missing = [p for p in params if not _documented(fn.__doc__ or "", p)]
    assert not missing, f"{fn.__qualname__}: undocumented {missing}"


def test_docs_name_existing_presets():
    text = "".join(open(os.path.join(ROOT, "docs", f)).read() for f in os.listdir(os.path.join(ROOT, "docs")))
    for cls, preset in re.findall(r"(\w+)\.like\(\"([\w-]+)\"", text):
        assert preset in getattr(fk, cls).presets, (cls, preset)


def test_nothing_points_outside_the_repository():
    # users have the repository only (the project's spec folder is not part of it)
    files = ["facekernels/heads.py", "facekernels/_params.py", "facekernels/functional.py", "facekernels/triplet.py",
             "facekernels/convert.py"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]
    for name in files:
        assert "shared/" not in open(os.path.join(ROOT, name)).read(), name


# ------------------------------------------------------------------------------ the documented examples run

DOC_FILES = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if f.endswith(".md")]  # fmt: skip
# the examples' sizes, scaled down so that every block runs in a test (d = 16; C = 97, sharded 101)
SMALL = [(r"\b100_000\b", "97"), (r"\b1_000_000\b", "101"), (r"\b512\b", "16")]
D, C, B = 16, 97, 8


def _python_blocks():
    """(code, "file:line") of every ```python block of README.md and docs/*.md, dedented (blocks inside a list
    item are indented) and scaled down (SMALL)."""
    for name in DOC_FILES:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for match in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, flags=re.MULTILINE | re.DOTALL):
            # a line marked "# before" is the peer's code that the next line replaces: shown, not run
            code = "\n".join(line for line in textwrap.dedent(match.group(2)).splitlines()
                              if not line.rstrip().endswith("# before"))  # fmt: skip
            for pattern, small in SMALL:
                code = re.sub(pattern, small, code)
            yield pytest.param(code, id=f"{name}:{text[: match.start()].count(chr(10)) + 1}")


class _MXNetArray:
    """What mx.model.load_checkpoint's arg_params hold, for the one MXNet example (MXNet is not installed)."""

    def __init__(self, array):
        self.array = array

    def asnumpy(self):
        return self.array


@pytest.fixture
def example_names(tmp_path, monkeypatch):
    """The names the examples take as given (embeddings, labels, a backbone, an optimizer, a checkpoint...),
    at the scaled-down sizes; a one-rank gloo group for the sharded example, destroyed afterwards."""
    import types

    import numpy as np
    import torch
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    backbone = torch.nn.Linear(10, D)
    head = fk.CurricularFace(D, C)
    # a CurricularFace checkpoint in the official layout with its optimizer (SGD with momentum, one step taken)
    theirs = fk.convert.to_curricularface(fk.CurricularFace(D, C).state_dict())
    kernel = torch.nn.Parameter(theirs["kernel"].clone())
    their_optimizer = torch.optim.SGD(list(backbone.parameters()) + [kernel], lr=0.1, momentum=0.9)
    for p in their_optimizer.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=g)
    their_optimizer.step()
    checkpoint = {"HEAD": theirs, "OPTIMIZER": their_optimizer.state_dict()}
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    # insightface's sub-center fc7 split over 2 GPUs, ceil(C / 2) k rows each, the last padded
    k, gpus = 3, 2
    fc7 = np.random.default_rng(0).standard_normal((gpus * -(-C // gpus) * k, D)).astype(np.float32)
    arg_params = {f"fc7_{i}_weight": _MXNetArray(part) for i, part in enumerate(np.split(fc7, gpus))}
    mx = types.SimpleNamespace(model=types.SimpleNamespace(load_checkpoint=lambda prefix, epoch: (None, arg_params,
                                                                                                   None)))  # fmt: skip
    # the sharded example's torchrun environment: one rank
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                           WORLD_SIZE="1").items():  # fmt: skip
        monkeypatch.setenv(key, value)
    names = dict(
        torch=torch, fk=fk, np=np, dist=dist, mx=mx,
        embeddings=torch.randn(B, D, generator=g), emb=torch.randn(B, D, generator=g),
        labels=torch.randint(0, C, (B,), generator=g), backbone=backbone, head=head,
        local_embeddings=torch.randn(B, D, generator=g), local_labels=torch.randint(0, 101, (B,), generator=g),
        micro_batches=[(torch.randn(B, 10, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(3)],
        optimizer=torch.optim.SGD(list(backbone.parameters()) + [head.weight], lr=0.1, momentum=0.9),
        micro_step=1, checkpoint=checkpoint, path=path, prefix="model", epoch=0, num_gpus=gpus, num_classes=C, k=k,
        embedding_size=D,
    )  # fmt: skip
    names["loader"] = names["micro_batches"]
    names["backbone_opt"] = torch.optim.SGD(backbone.parameters(), lr=0.1)
    yield names
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_documented_example_runs(code, example_names):
    # the MXNet example loads into a sub-center head
    if "fc7_" in code:
        example_names["head"] = fk.SubCenterArcFace(D, C, k=example_names["k"])
    # insightface's drop-in shards over the default group, which its trainer has initialised: one rank here
    if "PartialFC_V2(" in code and "init_process_group" not in code:
        example_names["dist"].init_process_group("gloo", rank=0, world_size=1)
        example_names["local_labels"] = example_names["labels"]
    exec(compile(code, "<documented example>", "exec"), example_names)


def test_every_documented_example_is_collected():
    # README's two blocks, docs/heads.md's one, docs/migration.md's three (a new block joins the list by itself)
    assert len(list(_python_blocks())) >= 6


@pytest.mark.parametrize("cls", fk.heads.HEAD_CLASSES.values(), ids=lambda c: c.__name__)
def test_the_weight_is_as_the_docstring_says(cls):
    # help(fk.AdaFace) said both "starts as unit-norm rows" and (the shared part) "initialised normal_(0, 0.01)"
    import torch

    head = cls(24, 300)
    k = head.params.subcenters
    assert tuple(head.weight.shape) == (300 * k, 24)
    unit = bool(torch.allclose(head.weight.norm(dim=1), torch.ones(300 * k), atol=1e-5))
    assert unit == cls.unit_norm_init
    assert ("starts as unit-norm rows" in cls.__doc__) == unit, cls.__doc__
    if not unit:  # normal_(0, 0.01): the std of 7,200+ draws within 5 %
        assert abs(head.weight.std().item() - 0.01) < 5e-4
    assert ("normal_(0, 0.01)" in cls.__doc__) == (not unit), cls.__doc__  # each head's own, from the registry
