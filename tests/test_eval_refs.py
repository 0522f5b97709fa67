"""magjax.refcheck.eval_cases against every case of the official-code reference file."""

import copy
import json

import pytest
from conftest import FIXTURES

from magjax.refcheck import eval_cases as refs

CASES = json.loads((FIXTURES / "eval_refs.json").read_text())["cases"]


def test_reference_file_format():
    data = json.loads((FIXTURES / "eval_refs.json").read_text())
    assert data["format"] == "magjax-eval-refs/1"
    assert {c["kind"] for c in CASES} == {"verification", "ijb"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches(case, dtype):
    passed, detail = refs.check_case(case, dtype)
    assert passed, detail
    assert "\n" not in detail and "FAIL" not in detail


def _perturbed(kind: str, field: str, delta: float):
    case = copy.deepcopy(next(c for c in CASES if c["kind"] == kind))
    expected = case["expected"]
    if field.startswith("tar@"):
        key = field[len("tar@") :]
        expected["tar_at_far"][key] += delta
    elif isinstance(expected[field], list):
        expected[field][3] += delta
    else:
        expected[field] += delta
    return case


@pytest.mark.parametrize(
    "kind,field,delta",
    [
        ("verification", "accuracy_mean", 1e-9),  # counts must match exactly
        ("verification", "best_thresholds", 0.01),
        ("verification", "tpr", 1e-6),
        ("verification", "val", 1e-9),
        ("verification", "accuracy_std", 1e-4),
        ("ijb", "scores", 1e-5),
        ("ijb", "tar@0.0001", 1e-9),
    ],
)
def test_checker_detects_wrong_values(kind, field, delta):
    passed, detail = refs.check_case(_perturbed(kind, field, delta), "float64")
    assert not passed
    assert "FAIL" in detail


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kind 'x'"):
        refs.check_case({"name": "c", "kind": "x"})
