"""Adapters are matched to the served base by the model's identity, not by the string."""

from __future__ import annotations

import pytest

from plait.server.adapters.base_identity import base_model_warning, model_identity, served_identities


@pytest.mark.parametrize(
    ("names", "identity"),
    [
        (
            [
                "meta-llama/Llama-3.1-8B-Instruct",
                "meta-llama/Meta-Llama-3.1-8B-Instruct",
                "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
                "unsloth/Llama-3.1-8B-Instruct-unsloth-bnb-4bit",
                "/models/llama-3.1-8b-instruct/",
            ],
            "llama-3.1-8b-instruct",
        ),
        (
            ["Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "C:\\models\\Qwen2.5-7B-Instruct"],
            "qwen2.5-7b-instruct",
        ),
        (["google/gemma-2-2b-it", "unsloth/gemma-2-2b-it-bnb-4bit"], "gemma-2-2b-it"),
    ],
)
def test_copies_of_one_model_share_its_identity(names, identity):
    assert {model_identity(n) for n in names} == {identity}


def test_another_base_is_warned_about_and_a_missing_name_is_not():
    served = served_identities(["Llama-3.1-8B-Instruct-bnb-4bit", None])
    assert base_model_warning("meta-llama/Meta-Llama-3.1-8B-Instruct", served) is None
    assert base_model_warning(None, served) is None
    assert "trained on 'meta-llama/Llama-3.1-70B'" in base_model_warning("meta-llama/Llama-3.1-70B", served)
    assert base_model_warning("Qwen/Qwen2.5-7B-Instruct", served) is not None
    # A name that is only a suffix is not emptied into matching everything.
    assert model_identity("-hf") == "-hf"
