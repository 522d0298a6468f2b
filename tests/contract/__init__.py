"""Contract checks for every RecordSource and OutputSink (in the style of River's ``checks/``)."""

import pytest

# The checks are plain functions outside the test modules: have pytest explain their failed asserts.
pytest.register_assert_rewrite("tests.contract.checks")
