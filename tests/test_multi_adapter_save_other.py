"""save_pretrained of a loaded adapter of another structure (IA3, also with modules_to_save; LoHa, LoKr, VeRA, OFT,
BOFT) against the real peft package (tests/multi_adapter_save_checks.py)."""

import warnings

import pytest

from multi_adapter_save_checks import *  # noqa: F401,F403 (the shared checks, collected here for these methods)
from multi_adapter_save_checks import Models


@pytest.fixture(scope="module", params=["ia3", "ia3_seq_cls", "loha", "lokr", "vera", "oft", "boft"])
def models(request, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield Models(request.param, tmp_path_factory.mktemp(request.param))
