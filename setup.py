"""Builds the switchyard Python package: the C++ core as a torch C++ extension (switchyard._C).

    python3 -m pip install --no-build-isolation .                  # into a venv
    python3 -m pip install --no-build-isolation --target DIR .     # anywhere (PEP 668 systems)

The extension is compiled against the torch that runs this script (once per torch version). It
compiles the library's sources itself (the list mirrors src/CMakeLists.txt without the MPI
backend), links OpenBLAS (found with pkg-config; SY_BLAS_LIBS and SY_BLAS_INCLUDE override) and
OpenMP. SY_PY_DEBUG=1 builds with -O0 -g.

CUDA: when torch sees a GPU at build time (or SY_PY_CUDA=1 with a CUDA toolkit and a CUDA build
of torch), the extension is a CUDAExtension that also compiles src/**/*.cu with nvcc, defines
SY_WITH_CUDA and links cuBLAS. Architectures come from TORCH_CUDA_ARCH_LIST (e.g. "9.0a" or
"8.0;9.0a"; default "9.0a", as CMAKE_CUDA_ARCHITECTURES defaults to 90a). SY_PY_CUDA=0 builds
the CPU-only extension.

NCCL (expert parallelism on CUDA ranks): a CUDA build also compiles the NCCL backend where it
finds nccl.h and libnccl.so.2, first under SY_NCCL_HOME, then in the nvidia-nccl package that
torch loads its NCCL from, then in the CUDA toolkit. It links by soname, so at run time the
extension shares the libnccl that torch has loaded. SY_PY_NCCL=0 leaves it out.
"""

import glob
import os
import shlex
import subprocess

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(path):
    return os.path.relpath(path, ROOT)


STAGES = ["core", "routing", "dispatch", "experts", "layer"]


def core_sources(with_nccl):
    srcs = []
    for stage in STAGES:
        srcs += sorted(glob.glob(os.path.join(ROOT, "src", stage, "*.cpp")))
    # The communication stage without MPI: its backend-neutral files, the no-MPI stub and the
    # NCCL factories (which throw a clear error where the NCCL backend is left out).
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "comm", "*.cpp"))):
        name = os.path.basename(path)
        if ("_mpi" in name and "no_mpi" not in name) or (name == "comm_nccl.cpp" and
                                                          not with_nccl):
            continue
        srcs.append(path)
    return [rel(s) for s in srcs]


def cuda_sources():
    srcs = []
    for stage in STAGES:
        srcs += sorted(glob.glob(os.path.join(ROOT, "src", stage, "*.cu")))
    return [rel(s) for s in srcs]


def want_cuda():
    """Whether to build the CUDA backend into the extension (see the module docstring)."""
    flag = os.environ.get("SY_PY_CUDA", "")
    if flag == "0":
        return False
    if flag == "1":
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError(
                "switchyard: SY_PY_CUDA=1 needs a CUDA toolkit (nvcc; set CUDA_HOME) and a CUDA "
                f"build of torch (this torch {torch.__version__} has CUDA {torch.version.cuda})")
        return True
    if flag:
        raise RuntimeError(f"switchyard: SY_PY_CUDA must be 0 or 1, got '{flag}'")
    return CUDA_HOME is not None and torch.cuda.is_available()


def cuda_arch_flags():
    """-gencode flags for TORCH_CUDA_ARCH_LIST, SASS and PTX for each architecture as CMake
    makes them for CMAKE_CUDA_ARCHITECTURES (torch adds none of its own once these are given).
    "+PTX" is accepted and changes nothing."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0a"
    flags = []
    for arch in archs.replace(";", " ").split():
        num = arch.replace("+PTX", "").replace(".", "")
        if not num[:2].isdigit():
            raise RuntimeError(f"switchyard: TORCH_CUDA_ARCH_LIST entry '{arch}' is not of the "
                               "form 9.0a or 8.0 (named architectures are not understood)")
        flags += [f"-gencode=arch=compute_{num},code=sm_{num}",
                  f"-gencode=arch=compute_{num},code=compute_{num}"]
    return flags


def find_nccl():
    """(include dir, library dir) of nccl.h and libnccl.so.2, or None (see the module docstring).
    The header and the library may come from different places (torch's NCCL package may lack
    the header): NCCL keeps its ABI within a major version."""
    if os.environ.get("SY_PY_NCCL", "") == "0":
        return None
    bases = []
    home = os.environ.get("SY_NCCL_HOME")
    if home:
        bases.append(home)
    try:
        import nvidia  # torch's own CUDA libraries (pip's nvidia-* packages), NCCL among them
        for root in nvidia.__path__:
            for lib in sorted(glob.glob(os.path.join(root, "**", "libnccl.so.2"), recursive=True)):
                bases.append(os.path.dirname(os.path.dirname(lib)))
    except ImportError:
        pass
    if CUDA_HOME:
        bases.append(CUDA_HOME)

    def first(paths):
        return next((os.path.dirname(p) for p in paths if os.path.exists(p)), None)

    inc = first(os.path.join(b, "include", "nccl.h") for b in bases)
    libdir = first(os.path.join(b, lib, "libnccl.so.2") for b in bases for lib in ("lib", "lib64"))
    if inc and libdir:
        return inc, libdir
    if home:
        raise RuntimeError(f"switchyard: no nccl.h or libnccl.so.2 under SY_NCCL_HOME={home} or "
                           "torch's and the CUDA toolkit's directories")
    return None


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True)
        return shlex.split(out.stdout)
    except (OSError, subprocess.CalledProcessError):
        return None


def find_cblas():
    """cblas.h and a BLAS library where CMake's find_package(BLAS) would look, for systems whose
    BLAS has no pkg-config file: (cflags, ldflags) or None."""
    import ctypes.util
    import sysconfig
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for base in ("/usr/local/include", "/usr/include", os.path.join("/usr/include", multiarch)):
        for sub in ("", "openblas", "openblas-pthread"):
            inc = os.path.join(base, sub)
            if os.path.isfile(os.path.join(inc, "cblas.h")):
                for lib in ("openblas", "blas"):
                    if ctypes.util.find_library(lib):
                        return ["-I" + inc], ["-l" + lib]
    return None


def blas_flags():
    include = os.environ.get("SY_BLAS_INCLUDE")
    libs = os.environ.get("SY_BLAS_LIBS")
    cflags = ["-I" + include] if include else pkg_config("--cflags", "openblas")
    ldflags = shlex.split(libs) if libs else pkg_config("--libs", "openblas")
    if (cflags is None or ldflags is None) and not (include or libs):
        cflags, ldflags = find_cblas() or (None, None)
    if cflags is None or ldflags is None:
        raise RuntimeError(
            "switchyard: OpenBLAS not found by pkg-config (Debian: apt-get install "
            "libopenblas-dev pkg-config), or set SY_BLAS_INCLUDE and SY_BLAS_LIBS")
    return cflags, ldflags


def extension():
    blas_cflags, blas_ldflags = blas_flags()
    debug = bool(os.environ.get("SY_PY_DEBUG"))
    opt = ["-O0", "-g"] if debug else ["-O2", "-g0"]
    cxx = ["-std=c++20", "-fopenmp", "-Wno-unused-parameter", "-Wno-deprecated-declarations", *opt, *blas_cflags]
    common = dict(
        name="switchyard._C",
        include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "src")],
        extra_link_args=["-fopenmp", *blas_ldflags],
    )
    if not want_cuda():
        sources = ["python/switchyard/csrc/binding.cpp"] + core_sources(with_nccl=False)
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    nccl = find_nccl()
    sources = ["python/switchyard/csrc/binding.cpp"] + core_sources(with_nccl=nccl is not None)
    macros = [("SY_WITH_CUDA", "1")]
    if nccl is not None:
        macros.append(("SY_WITH_NCCL", "1"))
        common["include_dirs"].append(nccl[0])
        common["extra_link_args"] += [f"-L{nccl[1]}", "-l:libnccl.so.2", f"-Wl,-rpath,{nccl[1]}"]
    print(f"switchyard: NCCL backend {'in ' + nccl[1] if nccl else 'left out (not found)'}")
    # The flags of src/CMakeLists.txt for .cu files: C++17 (what CMake gives nvcc), -lineinfo,
    # OpenMP in host code; --expt-relaxed-constexpr comes with torch's own nvcc flags. torch
    # also defines __CUDA_NO_HALF_OPERATORS__ and friends, which the library's kernels do not
    # expect (the CMake build leaves them undefined): undefine them.
    nvcc = ["-std=c++17", "-lineinfo", "-Xcompiler=-fopenmp",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            *(["-O0", "-g"] if debug else ["-O3"]), *cuda_arch_flags()]
    # SY_WITH_CUDA (and SY_WITH_NCCL) for every source, as CMake defines them for the whole
    # library: .cpp files learn through them which backends exist, binding.cpp that it may hand
    # CUDA tensors over.
    return CUDAExtension(sources=sources + cuda_sources(),
                         define_macros=macros,
                         libraries=["cublas", "cublasLt"],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)


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
