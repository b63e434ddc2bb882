"""save_pretrained of a loaded adapter of another structure (prompt tuning, prefix tuning: another number of virtual
tokens) against the real peft package (tests/multi_adapter_save_checks.py)."""

import warnings

import pytest

from multi_adapter_save_checks import *  # noqa: F401,F403 (the shared checks, collected here for these methods)
from multi_adapter_save_checks import Models


@pytest.fixture(scope="module", params=["prompt_tuning", "prefix"])
def models(request, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield Models(request.param, tmp_path_factory.mktemp(request.param))
