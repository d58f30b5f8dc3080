"""Builds oqfl_ext._C against the torch of the build environment.

    pip install .                            # isolated build against pyproject's pinned torch
    pip install --no-build-isolation .       # against the torch installed here (-e for development)

Either way the package requires exactly the torch it was compiled against (install_requires).

CPU kernels are always built; CUDA kernels whenever torch is a CUDA build and nvcc is found
(no GPU needed), unless OQFL_NO_CUDA=1. The build records what it was built against in
oqfl_ext/_build_info.py, which `import oqfl_ext` checks.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Default when no GPU is visible to pick the arch from: native code for Turing (T4), Ampere
# (8.0 code also runs on 8.6/8.7/8.9), Hopper and Blackwell, plus compute_100 PTX that the
# driver compiles for anything newer (RTX 50 series included). Each arch costs compile time.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0;10.0+PTX"

try:
    import torch
except ImportError:
    sys.exit(
        "oqfl_ext is compiled against torch, but torch cannot be imported in this build "
        "environment. Either let pip build it in isolation against the pinned torch:\n\n"
        "    pip install .\n\n"
        "or install the torch you want first and build against it:\n\n"
        "    pip install --no-build-isolation .\n"
    )


def cuda_toolkit_root():
    """CUDA_HOME, else the toolkit that `nvcc` on PATH really runs.

    nvcc may be a wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-X/bin/nvcc), which
    makes torch's own guess (the parent of nvcc's directory) wrong; `nvcc --dryrun` prints the
    real location in its _HERE_ line.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        match = None
    here = match.group(1) if match else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(os.path.normpath(here))


def want_cuda():
    if os.environ.get("OQFL_NO_CUDA", "0") not in ("", "0"):
        return False, "OQFL_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    root = cuda_toolkit_root()
    if root is None or not os.path.exists(os.path.join(root, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return True, f"CUDA {torch.version.cuda}, toolkit {root}"


WITH_CUDA, CUDA_REASON = want_cuda()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def torch_distribution_version():
    """The version pip knows this torch by: PyPI's CUDA wheel of 2.14.1 is distribution
    2.14.1 while torch.__version__ says 2.14.1+cu130, which no index offers."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # a torch built from source, not installed by pip
        return torch.__version__.split("+")[0]


def write_build_info():
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""
    text = (
        '"""Written by setup.py at build time: what oqfl_ext._C was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if WITH_CUDA else None!r}\n"
        f"CUDA_ARCH_LIST = {arch!r}\n"
    )
    with open(os.path.join(ROOT, "oqfl_ext", "_build_info.py"), "w") as f:
        f.write(text)


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/cpu/isa/*.cpp")
    # No -std flag: torch.utils.cpp_extension picks the standard this torch needs (C++17 or 20).
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; without the flag
    # it silently runs on one thread. The library resolves to the libgomp torch already loaded.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    nvcc = ["-O3"]
    kwargs = dict(
        name="oqfl_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )
    if WITH_CUDA:
        kwargs["define_macros"] = [("OQFL_WITH_CUDA", None)]
        return CUDAExtension(sources=sources + rel("csrc/cuda/*.cu"), **kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return CppExtension(sources=sources, **kwargs)


print(f"oqfl_ext: building against torch {torch.__version__}; CUDA kernels "
      f"{'on' if WITH_CUDA else 'off'} ({CUDA_REASON})", file=sys.stderr)
write_build_info()
setup(
    # the compiled _C works with this torch only (import oqfl_ext checks it too); zstandard is
    # the update codec's default compression; tqdm and matplotlib are the oqfl-fl command's
    # progress bar and plots
    install_requires=[f"torch=={torch_distribution_version()}", "numpy", "safetensors",
                      "zstandard", "tqdm", "matplotlib"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
