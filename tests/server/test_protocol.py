"""The completions prompt's four shapes, told apart by validation alone (no server)."""

import json

import pytest

from mnemosyne.server.protocol import APIError, CompletionRequest, parse_body
from mnemosyne.server.serving import check_token_ids


def _prompt(prompt):
    return parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode()).prompt


@pytest.mark.parametrize("prompt", ["hello", [1, 2, 3], [[1, 2], [3]], ["a", "b"], [], [""]])
def test_each_prompt_shape_is_kept_as_sent(prompt):
    assert _prompt(prompt) == prompt


@pytest.mark.parametrize("prompt", [[1, "a"], [[1], "a"], [True, 2], [1.5], {"a": 1}])
def test_mixed_or_foreign_prompts_are_400_on_prompt(prompt):
    with pytest.raises(APIError) as e:
        _prompt(prompt)
    assert e.value.status == 400 and e.value.param == "prompt"


def test_token_id_range():
    check_token_ids([0, 5, 9], 10)
    for bad in ([], [0, 10], [-1, 3]):
        with pytest.raises(APIError, match="prompt"):
            check_token_ids(bad, 10)
