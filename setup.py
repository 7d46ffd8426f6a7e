"""Builds the switchyard Python package: the C++ core as a torch C++ extension (switchyard._C).

    python3 -m pip install --no-build-isolation .                  # into a venv
    python3 -m pip install --no-build-isolation --target DIR .     # anywhere (PEP 668 systems)

The extension is compiled against the torch that runs this script (once per torch version). It
compiles the library's CPU sources itself (the list mirrors src/CMakeLists.txt without the CUDA
and MPI backends), links OpenBLAS (found with pkg-config; SY_BLAS_LIBS and SY_BLAS_INCLUDE
override) and OpenMP. SY_PY_DEBUG=1 builds with -O0 -g.
"""

import glob
import os
import shlex
import subprocess

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(path):
    return os.path.relpath(path, ROOT)


def core_sources():
    stages = ["core", "routing", "dispatch", "experts", "layer"]
    srcs = []
    for stage in stages:
        srcs += sorted(glob.glob(os.path.join(ROOT, "src", stage, "*.cpp")))
    # The communication stage without MPI and NCCL: its backend-neutral files, the no-MPI stub
    # and the NCCL factories (which then throw a clear error).
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "comm", "*.cpp"))):
        name = os.path.basename(path)
        if ("_mpi" in name and "no_mpi" not in name) or name == "comm_nccl.cpp":
            continue
        srcs.append(path)
    return [rel(s) for s in srcs]


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True)
        return shlex.split(out.stdout)
    except (OSError, subprocess.CalledProcessError):
        return None


def blas_flags():
    include = os.environ.get("SY_BLAS_INCLUDE")
    libs = os.environ.get("SY_BLAS_LIBS")
    cflags = ["-I" + include] if include else pkg_config("--cflags", "openblas")
    ldflags = shlex.split(libs) if libs else pkg_config("--libs", "openblas")
    if cflags is None or ldflags is None:
        raise RuntimeError(
            "switchyard: OpenBLAS not found by pkg-config (Debian: apt-get install "
            "libopenblas-dev pkg-config), or set SY_BLAS_INCLUDE and SY_BLAS_LIBS")
    return cflags, ldflags


def extension():
    blas_cflags, blas_ldflags = blas_flags()
    opt = ["-O0", "-g"] if os.environ.get("SY_PY_DEBUG") else ["-O2", "-g0"]
    cxx = ["-std=c++20", "-fopenmp", "-Wno-unused-parameter", "-Wno-deprecated-declarations", *opt, *blas_cflags]
    return CppExtension(
        name="switchyard._C",
        sources=["python/switchyard/csrc/binding.cpp"] + core_sources(),
        include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "src")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp", *blas_ldflags],
    )


setup(
    name="switchyard",
    version="0.1.0",
    description="Mixture-of-Experts layers: a C++ core with a Tutel-compatible PyTorch binding",
    package_dir={"": "python"},
    packages=["switchyard", "switchyard.examples"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # Out of the CMake build directory's way (build/ is CMake's by default).
    options={"build": {"build_base": "build-python"}},
    python_requires=">=3.8",
    zip_safe=False,
)
