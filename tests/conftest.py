"""Fixtures shared by the test modules. pytest puts this folder on the import path for the helpers
(tiny_model.py, pretrain_runs.py, ...); the project's packages come from the install."""
import os

import pytest


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A fresh project cache for a module (INTERN25_CACHE_DIR): its shapes datasets and the tiny text model are
    built there, and subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("INTERN25_CACHE_DIR")
    os.environ["INTERN25_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("INTERN25_CACHE_DIR", None)
    else:
        os.environ["INTERN25_CACHE_DIR"] = previous


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end variant; CI (CI=true) leaves it out unless "
                                       "RUN_SLOW=1, a local run includes it")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CI", "").lower() != "true" or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow variant: CI runs its sibling cases; RUN_SLOW=1 runs it too")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
