"""The shared test kit (tests/kit.py): its assertions fail when they should and say where."""

import kit
import pytest
import torch


def test_assert_close_reports_count_worst_and_first_offenders():
    want = torch.zeros(4, 5, dtype=torch.float64)
    got = want.clone()
    got[1, 2], got[3, 4] = 1e-3, 5e-3
    kit.assert_close(got, want, rtol=0, atol=1e-2)
    with pytest.raises(AssertionError) as err:
        kit.assert_close(got, want, rtol=0, atol=1e-4, what="dx")
    text = str(err.value)
    assert "dx: 2 of 20 elements differ" in text and "largest error 5.000e-03 at (3, 4)" in text
    assert "at (1, 2): got 0.001" in text


def test_assert_close_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    kit.assert_close(torch.tensor([inf, -inf]), torch.tensor([inf, -inf]), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="1 of 2"):
        kit.assert_close(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0]), rtol=0.1, atol=0.1)
    with pytest.raises(AssertionError, match="1 of 2"):
        kit.assert_close(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]), rtol=0, atol=0)
    kit.assert_close(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(AssertionError, match="shape"):
        kit.assert_close(torch.zeros(2), torch.zeros(3), rtol=0, atol=0)


def test_error_ratio_rule():
    want = torch.full((3,), 10.0, dtype=torch.float64)
    low = want + 1e-3  # the eager float32 error
    kit.assert_error_ratio(want + 3e-3, low, want)
    with pytest.raises(AssertionError, match="kernel error 5.000e-03 > 4.0 x eager error 1.000e-03"):
        kit.assert_error_ratio(want + 5e-3, low, want)
    # an exact baseline leaves the floor: 1e-6 of the largest magnitude
    kit.assert_error_ratio(want + 9e-6, want, want)
    with pytest.raises(AssertionError):
        kit.assert_error_ratio(want + 2e-5, want, want)
    with pytest.raises(AssertionError):
        kit.assert_error_ratio(want * float("nan"), low, want)


def test_head_inputs_shapes_ignore_and_near_rows():
    x, w, y = kit.head_inputs(301, 7, 5, dtype=torch.float32, ignore_frac=0.3, ignore_index=-1)
    assert x.shape == (301, 5) and w.shape == (7, 5) and y.shape == (301,) and x.dtype == w.dtype == torch.float32
    ignored = y == -1
    assert 0.15 < ignored.float().mean() < 0.45 and ((y[~ignored] >= 0) & (y[~ignored] < 7)).all()
    x, w, y = kit.head_inputs(400, 7, 5)
    c = torch.nn.functional.cosine_similarity(x, w[y], dim=1)
    assert (c > 0.8).float().mean() > 0.3 and (c < 0.5).float().mean() > 0.3  # near rows and random rows


def test_triplet_inputs_plain_and_clustered():
    e, y = kit.triplet_inputs(31, 4, 9, dtype=torch.bfloat16)
    assert e.shape == (31, 9) and e.dtype == torch.bfloat16 and y.shape == (31,) and y.max() < 4
    g = torch.Generator().manual_seed(3)
    e, y = kit.triplet_inputs(200, 3, 8, spread=0.05, generator=g)
    same = y.unsqueeze(0) == y.unsqueeze(1)
    d = torch.cdist(e, e)
    assert d[same].max() < d[~same].min()
