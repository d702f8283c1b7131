"""Build svdgrow and its C++/CUDA extension (``svdgrow._C``).

Always builds the CPU kernels. Builds the CUDA kernels too when ``FORCE_CUDA=1``, or when
nvcc and a GPU are both found. ``TORCH_CUDA_ARCH_LIST`` (for example ``9.0``) lets a machine
without a GPU build for one. Install with ``pip install --no-build-isolation .`` so the build
uses the torch that is already installed.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - a build-time message, not library code
    sys.exit(
        "svdgrow: torch must be installed before building, and the build must see it: "
        "pip install torch, then pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_path():
    home = cpp_extension.CUDA_HOME
    if home is None:
        return None, None
    nvcc = os.path.join(home, "bin", "nvcc")
    return (home, nvcc) if os.path.exists(nvcc) else (home, None)


def _choose_cuda():
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    home, nvcc = _nvcc_path()
    if force:
        if nvcc is None:
            sys.exit(
                "svdgrow: FORCE_CUDA=1 but nvcc was not found "
                f"(CUDA_HOME={home!r}). Install the CUDA toolkit, or set CUDA_HOME to its "
                "root (the folder holding bin/nvcc and lib64/libcudart.so), or unset "
                "FORCE_CUDA to build the CPU kernels only."
            )
        if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            sys.exit(
                f"svdgrow: CUDA_HOME={home!r} has no include/cuda_runtime.h; point CUDA_HOME "
                "at the toolkit root (if nvcc on PATH is a wrapper script, at the folder "
                "that the wrapper runs nvcc from, minus bin/nvcc)."
            )
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA support"
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME, or FORCE_CUDA=1 to insist)"
    if not torch.cuda.is_available():
        return False, "no GPU found (FORCE_CUDA=1 builds the CUDA kernels anyway)"
    return True, "nvcc and a GPU found"


def _extra_cuda_includes():
    """cuBLAS/cuSOLVER headers that torch's own headers include ship in pip's nvidia/ packages."""
    found = []
    for path in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            cand = os.path.join(path, sub)
            if os.path.isdir(cand):
                found.append(cand)
        for cand in glob.glob(os.path.join(path, "nvidia", "*", "include")):
            if os.path.isdir(cand) and cand not in found:
                found.append(cand)
    return found


def _extensions():
    with_cuda, why = _choose_cuda()
    print(f"svdgrow: building the {'CPU and CUDA' if with_cuda else 'CPU'} kernels ({why})")
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        include_dirs += _extra_cuda_includes()
        define_macros.append(("WITH_CUDA", None))
    return [
        ext_cls(
            "svdgrow._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="svdgrow",
    version="0.1.0",
    description="Let a network find its own layer widths while it trains, from each layer's spectrum",
    long_description=open(os.path.join(ROOT, "README.md")).read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["svdgrow", "svdgrow.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["svdgrow=svdgrow.app.cli:main"]},
)
