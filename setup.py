"""Build minimind_fast: the Python package, kernels/ as minimind_fast.kernels, and the
C++/CUDA extension minimind_fast._C from csrc/.

Sources by convention:
  csrc/*.cpp         CPU implementation + TORCH_LIBRARY schema (always built)
  csrc/cuda/*.cu     CUDA kernels with no torch header (built when torch has CUDA and nvcc exists)
  csrc/cuda/*.cpp    the torch binding for those kernels (built with them)
Install with `pip install --no-build-isolation -e .` after torch is installed.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpu_sources:
        return [], {}
    cxx_flags = [
        "-O3",
        "-g0",
        "-std=c++20",
        "-fopenmp",
    ]  # C++20: torch >= 2.13 headers; -g0: no debug info (a faster build)
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("MINIMIND_FAST_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]  # exact expf: routing is memory-bound
        if not arch:
            nvcc_flags += [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90",
            ]
        ext = CUDAExtension(
            "minimind_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("MINIMIND_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "minimind_fast._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["minimind_fast", "minimind_fast.*"])
    + ["minimind_fast.kernels"],
    package_dir={"minimind_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
