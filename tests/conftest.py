"""Shared test configuration. The broker fixtures come from the project's own pytest plugin, aiida_zmq.testing."""

from __future__ import annotations

import pytest

# The example plugin's own tests run in a pytest session of their own (tests/test_plugin_example.py), not in this one.
collect_ignore = ['plugin_example']


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption('--run-slow', action='store_true', help='also run the long variants (soak, 1M tasks)')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption('--run-slow'):
        return
    skip = pytest.mark.skip(reason='long variant: run with --run-slow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)
