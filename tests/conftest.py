"""Fixtures shared by the tests."""

import pytest


@pytest.fixture(params=[False, True], ids=["tensor", "tuple"])
def tuple_state(request):
    return request.param
