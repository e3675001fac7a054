"""Suite-wide hooks: the Triton files' interpreter runs start in the background once the tests are selected
(tests/background.py)."""
from __future__ import annotations

import background

FRESH = "test_cpu_kernels_in_fresh_process"


def pytest_collection_modifyitems(session, config, items):
    paths = []
    for item in items:
        skip = item.get_closest_marker("skipif")
        if item.name == FRESH and not (skip is not None and skip.args and skip.args[0]):
            paths.append(str(item.path))
    background.start(paths)


def pytest_sessionfinish(session, exitstatus):
    background.stop()
