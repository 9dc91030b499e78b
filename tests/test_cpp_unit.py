"""The C++ unit test of the ops (csrc/tests/, registered with ctest by CMakeLists.txt).

Configures CMakeLists.txt against the installed torch, builds, and runs ctest. The build
directory lives in the system temp folder, keyed by the checkout path, so a rerun only rebuilds
what changed. Skipped, with the reason, only where cmake is missing.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    shown = " ".join(map(str, command))
    assert result.returncode == 0, f"{shown}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.skipif(CMAKE is None or CTEST is None, reason="cmake/ctest not installed")
def test_ctest_passes():
    key = hashlib.sha1(f"{ROOT}|{sys.executable}|{torch.__version__}".encode()).hexdigest()[:12]
    build = pathlib.Path(tempfile.gettempdir()) / f"minimind_fast_cmake_{key}"
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    run(
        [
            CMAKE,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        timeout=600,
    )
    run([CMAKE, "--build", str(build), "-j", jobs], timeout=1200)
    result = run([CTEST, "--test-dir", str(build), "--output-on-failure"], timeout=600)
    assert "100% tests passed" in result.stdout
