"""The proxy's `--generation-config DIR` defaults apply to a request as the engine applies its own:
a default parallel rule is the pace of the file's algorithm, and a request's own pace wins."""

from __future__ import annotations

from typing import Any

import pytest

from vdiff_client.protocol import CompletionRequest
from vdiff_client.sampling import defaults_for

RULE_FILE = {"algorithm": "low_confidence", "threshold": 0.9, "steps": 72, "block_length": 72, "max_tokens": 72}


def request(**fields: Any) -> CompletionRequest:
    return CompletionRequest(model="m", prompt="x", **fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"algorithm": "low_confidence", "threshold": 0.9, "block_length": 72, "max_tokens": 72}),
        ({"steps": 36}, {"algorithm": "low_confidence", "block_length": 72, "max_tokens": 72}),
        ({"factor": 1.0}, {"algorithm": "low_confidence", "block_length": 72, "max_tokens": 72}),
        ({"algorithm": "random"}, {"algorithm": "low_confidence", "steps": 72, "block_length": 72, "max_tokens": 72}),
        ({"algorithm": "apd"}, {"algorithm": "low_confidence", "max_tokens": 72}),
    ],
    ids=["nothing chosen", "own steps", "own rule", "another algorithm", "apd"],
)
def test_the_files_rule_applies_only_where_the_request_chose_no_pace(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert defaults_for(request(**fields), RULE_FILE) == expected


def test_a_file_without_a_rule_keeps_its_steps() -> None:
    schedule = {"algorithm": "low_confidence", "steps": 40}
    assert defaults_for(request(), schedule) == schedule
    assert defaults_for(request(threshold=0.95), schedule) == {"algorithm": "low_confidence"}


def test_a_file_without_alg_keeps_its_rule_for_the_familys_algorithm_named_explicitly() -> None:
    rule = {"threshold": 0.9, "max_tokens": 72}
    assert defaults_for(request(algorithm="low_confidence"), rule) == rule
