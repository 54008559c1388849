"""SearchSpec: the settings shared by cn4 search, the REST API and batch files."""

from __future__ import annotations

import pytest

from search.spec import MAX_TRIALS, SearchSpec, SpecError


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"levels": 7}, "levels=7 is invalid"),
        ({"levels": "123"}, "levels='123' is invalid"),
        ({"levels": ["a"]}, "levels contains 'a'"),
        ({"levels": [1.7]}, "levels contains 1.7"),
        ({"levels": [True]}, "levels contains True"),
        ({"levels": [5]}, "levels [5] are invalid"),
        ({"calibration_windows": "ten"}, "calibration_windows='ten' is invalid"),
        ({"window": None}, "window=None is invalid"),
        ({"window": 100_000_000}, "window=100000000 is invalid"),
        ({"model": 123}, "model=123 is invalid"),
        ({"device": 123}, "device=123 is invalid"),
        ({"seed": "x"}, "seed='x' is invalid"),
        ({"measure": "no"}, "measure='no' is invalid"),
        ({"multi_objective": "yes"}, "multi_objective='yes' is invalid"),
        ({"extra": 5}, "extra=5 is invalid"),
        ({"trials": True}, "trials=True is invalid"),
        ({"trials": MAX_TRIALS + 1}, f"trials={MAX_TRIALS + 1} is invalid"),
        ({"budget_ratio": "0.5"}, "budget_ratio='0.5' is invalid"),
        ({"budget_ratio": 0}, "budget_ratio=0.0 is invalid"),
        ({"budget_ms": float("nan")}, "budget_ms=nan is invalid"),
        ({"calibration_text": 3}, "calibration_text=3 is invalid"),
    ],
)
def test_spec_rejects_bad_value(settings, expected):
    with pytest.raises(SpecError) as caught:
        SearchSpec(**settings)
    assert expected in str(caught.value)


def test_spec_error_is_value_error():
    with pytest.raises(ValueError):
        SearchSpec(trials=0)


def test_spec_normalises_levels_and_numbers():
    spec = SearchSpec(levels=[3, 1, 3], budget_ms=2)
    assert spec.levels == (1, 3)
    assert spec.budget_ms == 2.0
    assert isinstance(spec.budget_ms, float)


def test_spec_default_budget_applies_alone():
    assert SearchSpec().uses_default_budget
    assert not SearchSpec(budget_ratio=0.7).uses_default_budget
    assert not SearchSpec(budget_ms=1.5).uses_default_budget
    assert not SearchSpec(sparsity_target=0.5).uses_default_budget


def test_spec_dict_round_trip():
    spec = SearchSpec(levels=(0, 2), budget_ratio=0.8, trials=5, extra={"note": "x"})
    assert SearchSpec.from_dict(spec.to_dict()) == spec


def test_spec_from_dict_rejects_unknown_setting():
    with pytest.raises(SpecError) as caught:
        SearchSpec.from_dict({"budget": 3})
    assert "unknown settings ['budget']" in str(caught.value)
