"""The documentation users have: every argument of the public classes and functions is described in their
docstrings, the docs name only presets that exist, and nothing points to material outside the repository."""

import inspect
import os
import re

import pytest

import facekernels as fk
from facekernels import functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC = [fk.NormSoftmax, fk.ArcFace, fk.CosFace, fk.CombinedMargin, fk.MVSoftmax, fk.CurricularFace,
          fk.TripletMarginLoss, fk.optim.SGD, fk.optim.AdamW]  # fmt: skip
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
