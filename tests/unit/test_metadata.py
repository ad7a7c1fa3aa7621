"""Typed reading of artifact JSON: every malformed field is one line naming file and field."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kedit_vfl.errors import UserError
from kedit_vfl.metadata import typed


@dataclass(frozen=True)
class Sizes:
    width: int
    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    layers: tuple[str, ...] = ()
    pairs: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    on: bool = False

    def __post_init__(self) -> None:
        if self.width < 1:
            raise UserError(f"--width {self.width}: must be positive")


def test_a_well_formed_mapping_becomes_the_dataclass() -> None:
    raw = {"width": 3, "rate": 1, "names": ["a"], "layers": ["x", "y"], "pairs": {"k": 2}, "on": True}
    expected = Sizes(3, 1.0, ["a"], ("x", "y"), {"k": 2}, None, True)
    assert typed(Sizes, raw, "f.safetensors", "model") == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("x", "'model' is not a JSON object"),
        ({}, "'model' lacks \\['width'\\]"),
        ({"width": 1, "extra": 2}, "unknown fields \\['extra'\\]"),
        ({"width": "1"}, "model.width: expected int, got str"),
        ({"width": True}, "model.width: expected int, got bool"),
        ({"width": 1, "rate": float("nan")}, "model.rate: expected float"),
        ({"width": 1, "names": [1]}, "model.names\\[0\\]: expected str, got int"),
        ({"width": 1, "pairs": {"k": "v"}}, "model.pairs.k: expected int"),
        ({"width": 1, "note": 3}, "model.note: expected str \\| None, got int"),
        ({"width": 0}, "'model': --width 0: must be positive"),
    ],
)
def test_malformed_fields_are_named(raw: object, expected: str) -> None:
    with pytest.raises(UserError, match=f"^f.safetensors: artifact metadata is malformed .*{expected}"):
        typed(Sizes, raw, "f.safetensors", "model")
