"""The head registry (facekernels/_head_params.py): every head is declared once, as a HeadSpec, and its class,
docstring, docs/heads.md row, functional form, bench and conformance follow from it. A head that is one point of
the parametrisation is added by registering a spec and nothing else (the ``extra_head`` fixture does it)."""

import ast
import inspect
import os
import re

import kit
import oracle
import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf
from facekernels import heads
from facekernels._head_params import SPECS, HeadSpec, head_names, register_head, unregister_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_LIST = list(SPECS.values())  # the built-in heads


def _spec_id(spec):
    return spec.class_name


def _value(text: str):
    return ast.literal_eval(text)  # 64, 0.35, 1e-3, True, "arc"


def _documented_defaults() -> dict:
    """class name -> {argument: value} as docs/heads.md's tables write them: the first table's
    `Head(s=64, m=0.5)` cells and the last column of the "More heads" table (`s=64, m=0.4, ...`)."""
    rows = {}
    with open(os.path.join(ROOT, "docs", "heads.md")) as f:
        for line in f:
            for name, args in re.findall(r"^\| `(\w+)\(([^`]*)\)` \|", line):
                if "..." in args:
                    continue
                rows.setdefault(name, {}).update({k: _value(v) for k, v in re.findall(r"(\w+)=([^,]+)", args)})
            match = re.match(r"^\| `(\w+)` \|.*\| `([^`]*=[^`]*)` \|$", line.strip())
            if match:
                pairs = re.findall(r"(\w+)=([^,]+)", match[2])
                rows.setdefault(match[1], {}).update({k: _value(v.strip()) for k, v in pairs})
    return rows


@pytest.mark.parametrize("spec", SPEC_LIST, ids=_spec_id)
def test_class_signature_and_docstring_agree_with_the_registry(spec):
    assert getattr(fk, spec.class_name) is heads.module_class(spec.name)  # exported
    _check_class_agrees(spec)


def _check_class_agrees(spec):
    cls = heads.module_class(spec.name)
    assert cls.__name__ == spec.class_name and cls.head == spec.name and cls.spec is spec
    params = inspect.signature(cls).parameters
    positional = [p for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional[:2]] == ["in_features", "num_classes"]
    own = {p.name: p.default for p in positional[2:] if p.name != "generator"}
    assert own == spec.defaults and list(own) == list(spec.defaults)  # the published defaults, in their order
    assert ("generator" in params) == spec.generator
    assert ("fallback" in params) == (spec.fallback_note is not None)
    assert ("interclass_filtering_threshold" in params) == spec.filtering
    for name, text in spec.arg_docs.items():  # the spec's words, in the class docstring
        assert f"        {name}: {text}" in cls.__doc__, name
    assert cls.presets == spec.presets and cls.unit_norm_init == spec.unit_norm_init
    head = cls(5, 3)
    assert head.margins == {**spec.defaults, **spec.head_options()}
    assert {n: float(getattr(head, n)) for n in spec.state} == spec.state  # the state as the spec starts it
    for preset in spec.presets:
        assert cls.like(preset, 5, 3).params == fk.head_params(spec.name, **spec.presets[preset])


@pytest.mark.parametrize("spec", SPEC_LIST, ids=_spec_id)
def test_docs_heads_md_tables_agree_with_the_registry(spec):
    documented = _documented_defaults().get(spec.class_name)
    assert documented, f"docs/heads.md has no row with {spec.class_name}'s defaults"
    assert "s" in documented
    for name, value in documented.items():
        assert name in spec.defaults, f"docs/heads.md gives {spec.class_name} an argument {name}"
        assert value == spec.defaults[name], f"docs/heads.md: {spec.class_name} {name}={value}"


def test_every_registered_head_is_in_the_conformance_matrices():
    # tests/test_heads.py runs every backend against the reference over kit.CASES (and test_reference_heads /
    # test_heads_more the reference against the independent oracles): a head registered without a case there
    # would have no conformance test
    covered = {case.head for case in kit.CASES.values()}
    assert set(SPECS) <= covered, f"heads without a conformance case: {sorted(set(SPECS) - covered)}"


def test_registering_an_existing_name_or_an_undocumented_argument_raises():
    cosface = SPECS["cosface"]
    with pytest.raises(ValueError, match="already registered"):
        register_head(cosface)
    with pytest.raises(ValueError, match=r"undocumented \['m'\]"):
        register_head(HeadSpec("x", "X", dict(s=1.0, m=0.1), cosface.build, "X.", dict(s="scale.")))
    assert "x" not in SPECS


# ------------------------------------------------- a new head: one registry entry, picked up everywhere

@pytest.fixture
def extra_head(monkeypatch):
    """CosFace with insightface's margin 0.4 as a head of its own: the whole change is this spec."""
    cosface = SPECS["cosface"]
    spec = register_head(HeadSpec(
        "cosface_m04", "CosFaceM04", dict(s=64.0, m=0.4), cosface.build,
        "CosFace with m = 0.4 by default (insightface's setting): the target logit s * (cos(theta) - m).",
        dict(cosface.arg_docs), filtering=True,
    ))  # fmt: skip
    # the independent float64 oracle's CosFace case, at this head's margin
    monkeypatch.setitem(kit.CASES, "cosface", kit.Case("cosface", dict(s=64.0, m=0.4)))
    yield spec
    unregister_head(spec.name)


def test_a_registered_head_gets_a_module_a_functional_form_and_docs(extra_head):
    cls = heads.module_class("cosface_m04")
    assert cls.__name__ == "CosFaceM04" and "cosface_m04" in head_names()
    assert inspect.signature(cls).parameters["m"].default == 0.4
    _check_class_agrees(extra_head)
    for p in inspect.signature(cls).parameters:  # test_docs' rule: every argument in the class docstring
        assert re.search(rf"^\s+{p}:", cls.__doc__, flags=re.MULTILINE), p
    x, w, y = kit.head_inputs(9, 13, 6)
    head = cls(6, 13, backend="reference").double()
    with torch.no_grad():
        head.weight.copy_(w)
    want = fk.CosFace(6, 13, m=0.4, backend="reference").double()
    with torch.no_grad():
        want.weight.copy_(w)
    assert torch.equal(head(x, y), want(x, y))
    got = fkf.margin_cross_entropy(x, w, y, "cosface_m04", backend="reference")
    assert torch.equal(got, want(x, y))
    with pytest.raises(ValueError, match="head must be one of"):
        fkf.margin_cross_entropy(x, w, y, "cosface_m05")


@pytest.mark.parametrize("backend", kit.HEAD_BACKENDS)
def test_a_registered_head_conforms_on_every_backend(extra_head, backend):
    # the conformance check of tests/test_heads.py: float64 against the independent oracle, loss and gradients
    dtype = kit.precise_dtype(backend)
    x, w, y = kit.head_inputs(11, 37, 8, ignore_frac=0.2, dtype=dtype)

    def loss_and_grads(fn, x, w):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xa, wa)
        loss.backward()
        return [loss, xa.grad, wa.grad]

    got = loss_and_grads(lambda a, b: fkf.margin_cross_entropy(*kit.to_backend(backend, a, b, y), "cosface_m04",
                                                               backend=backend).cpu(), x, w)  # fmt: skip
    want = loss_and_grads(lambda a, b: oracle.head_loss(a, b, y, "cosface")[0], x.double(), w.double())
    if dtype == torch.float64:
        for name, a, b in zip(("loss", "dx", "dw"), got, want):
            kit.assert_close(a, b, rtol=1e-9, atol=1e-10, what=name)
        return
    low = loss_and_grads(lambda a, b: fkf.margin_cross_entropy(a, b, y, "cosface_m04", backend="reference"), x, w)
    for name, a, b, c in zip(("loss", "dx", "dw"), got, low, want):
        kit.assert_error_ratio(a, b, c, floor=kit.logit_floor(64.0, dtype), what=name)


def test_a_registered_head_is_benchmarked(extra_head):
    from facekernels.benchmark import cli
    from facekernels.benchmark.ops import OPS, HeadShape

    assert cli.parser().parse_args(["--heads", "cosface_m04"]).heads == ["cosface_m04"]
    step = OPS["heads"].setup("eager", HeadShape("cosface_m04", 3, 8, 5), "full", torch.device("cpu"))
    step()
