"""Test setup: run the real Triton kernels on CPU through the interpreter when no GPU exists,
and keep the data cache in a per-session temporary directory.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test
module imports minimind_fast.
"""

import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never read or write the user's cache (~/.cache/minimind_fast): each session starts clean,
# as CI does.
_SESSION_CACHE = None
if "MINIMIND_FAST_CACHE" not in os.environ:
    _SESSION_CACHE = os.environ["MINIMIND_FAST_CACHE"] = tempfile.mkdtemp(
        prefix="minimind_fast_test_cache_"
    )

HAS_CUDA = torch.cuda.is_available()


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
