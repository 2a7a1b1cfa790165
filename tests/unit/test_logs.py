"""Structured log fields: one line per event, no forged fields, no addresses."""

from __future__ import annotations

import json

import pytest

from shared.logs import invalid_fields, kv


def test_plain_values_stay_bare_and_empty_ones_are_left_out():
    assert kv(user="u_1", n=3, took=0.25, skip=None, empty="") == "user=u_1 n=3 took=0.2"


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "x\n", 'say "hi" b=2', "back\\slash", "tab\there", "é"])
def test_other_values_are_quoted_so_they_cannot_end_the_line_or_forge_a_field(value):
    line = kv(reason=value, cid="c1")
    assert "\n" not in line and "\r" not in line and "\t" not in line
    assert line.endswith(" cid=c1") and line.count(" cid=") == 1
    assert json.loads(line[len("reason="):-len(" cid=c1")]) == value  # nothing lost, only escaped


def test_values_that_look_like_addresses_are_redacted():
    assert kv(who="someone@example.com") == "who={redacted}"
    assert kv(who="a\nsomeone@example.com") == "who={redacted}"


def test_a_bodys_unknown_keys_are_never_named_where_it_went_wrong():
    from pydantic import BaseModel, ConfigDict, ValidationError

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")
        count: int
        tags: list[int] = []

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"count": "x", "tags": [1, "y"], "jane@contoso.example": 1})
    assert invalid_fields(caught.value) == ["count", "tags.1", "(unexpected field)"]

