"""The data tests' shared fixture: the small mix of `builder_helpers.write_mix`."""

import pytest
from builder_helpers import write_mix


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return write_mix(tmp_path_factory.mktemp("mix"))
