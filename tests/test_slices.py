"""Query slices: the built-in rules and config-defined regular expressions."""

from __future__ import annotations

import pytest

from near2_tasks.config import load_settings
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.slices import BUILTIN_SLICES, slice_masks

QUERIES = [
    "drill",  # short
    "cordless drill",  # short
    "l shaped shelf bracket",  # four tokens: neither short nor long
    "20v brushless cordless drill by dewalt",  # long, alphanumeric (20v)
    "DCD771C2",  # short, alphanumeric
    "1/2 in pvc",  # digits and letters in different tokens: not alphanumeric
    "Ｗ１２ bolt",  # full-width letters and digits still mix
    "",  # no tokens: no slice
]


def members(name: str, extra: dict[str, str] | None = None) -> list[str]:
    mask = slice_masks(QUERIES, extra)[name]
    return [q for q, inside in zip(QUERIES, mask) if inside]


def test_builtin_slices():
    assert members("short") == ["drill", "cordless drill", "DCD771C2", "Ｗ１２ bolt"]
    assert members("long") == ["20v brushless cordless drill by dewalt"]
    assert members("alphanumeric") == ["20v brushless cordless drill by dewalt", "DCD771C2", "Ｗ１２ bolt"]


def test_config_slices_are_regular_expressions_added_after_the_builtin_ones():
    masks = slice_masks(QUERIES, {"drills": r"(?i)\bdrill\b", "pipe": "pvc"})
    assert list(masks) == [*BUILTIN_SLICES, "drills", "pipe"]
    assert members("drills", {"drills": r"(?i)\bdrill\b"}) == [
        "drill", "cordless drill", "20v brushless cordless drill by dewalt"]
    assert not slice_masks(QUERIES, {"none": "zzz"})["none"].any()


def test_config_rejects_a_slice_that_shadows_a_builtin_one_or_an_invalid_regex():
    with pytest.raises(Near2Error, match="built in"):
        load_settings(evaluation={"slices": {"short": "x"}})
    with pytest.raises(Near2Error, match=r"evaluation\.slices.*not a valid regular expression"):
        load_settings(evaluation={"slices": {"broken": "(unclosed"}})
    assert load_settings(evaluation={"slices": {"paint": "(?i)paint"}}).evaluation.slices == {"paint": "(?i)paint"}
