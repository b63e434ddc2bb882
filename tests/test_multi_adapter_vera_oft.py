"""Several VeRA and OFT adapters in one compiled model against the real peft package: load, switch, several active
(summed for VeRA, rotations composed for OFT), disable, delete within 1e-5; mixed batches refused (tests/multi_adapter_checks.py)."""

import pytest

from multi_adapter_checks import *  # noqa: F401,F403 (the shared checks, collected here for these methods)
from multi_adapter_checks import Pair


@pytest.fixture(scope="module", params=["vera", "oft"])
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory.mktemp(request.param))
