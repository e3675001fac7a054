"""Suite-wide hooks: the Triton files' interpreter runs start in the background once the tests are selected
(tests/background.py)."""
from __future__ import annotations

import background


def pytest_collection_modifyitems(session, config, items):
    background.start([path for item in items if (path := getattr(getattr(item, "function", None),
                                                                   "background_path", None))])


def pytest_sessionfinish(session, exitstatus):
    background.stop()
