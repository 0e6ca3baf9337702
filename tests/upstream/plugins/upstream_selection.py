"""pytest plugin of the upstream runner: keeps the tests that the runner selects, drops the ones it must not run.

Loaded by ``tests/upstream/run.py`` with ``-p upstream_selection``; the selection is the JSON in
``$AIIDA_ZMQ_UPSTREAM_SELECTION``:

- ``markers`` and ``paths`` (aiida-core): a test is kept if it carries one of the markers or its file is one of the
  paths or lies under one of them (relative to the rootdir, ``/`` separated). This runs after aiida-core's own
  ``pytest_collection_modifyitems``, which adds ``requires_broker`` to every test that uses the daemon fixtures, so
  the markers are the ones aiida-core's CI selects by;
- ``not_run``: node id patterns (``*`` matches anything, nothing else is special) of tests deselected whatever the
  rest says: the ``not-run`` entries of ``expected_failures.yaml``.
"""

from __future__ import annotations

import json
import os
import re

import pytest


def node_pattern(pattern: str) -> re.Pattern[str]:
    """A node id pattern: ``*`` matches any text; ``[``, ``?`` and the rest of a node id are themselves."""
    return re.compile('.*'.join(re.escape(part) for part in pattern.split('*')) + r'\Z')


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selection = json.loads(os.environ.get('AIIDA_ZMQ_UPSTREAM_SELECTION') or '{}')
    markers = set(selection.get('markers', ()))
    paths = [path.rstrip('/') for path in selection.get('paths', ())]
    not_run = [node_pattern(pattern) for pattern in selection.get('not_run', ())]
    kept, dropped = [], []
    for item in items:
        path = item.nodeid.split('::', 1)[0]
        selected = not (markers or paths)
        selected = selected or any(path == prefix or path.startswith(prefix + '/') for prefix in paths)
        selected = selected or bool(markers.intersection(marker.name for marker in item.iter_markers()))
        if selected and not any(pattern.match(item.nodeid) for pattern in not_run):
            kept.append(item)
        else:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
