"""Build of fastlora's C++ op library (fastlora._C).

torch extensions are tied to the exact torch they are compiled against, so fastlora builds
against the torch that is already installed: install torch first, then
``pip install --no-build-isolation .`` (see README). The top-level ``kernels/`` folder (Triton
kernels) is installed into the subpackage ``fastlora.kernels``; it is not a package itself, so
it never shadows an installed top-level ``kernels`` (see fastlora/kernels/__init__.py).
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # pragma: no cover - only hit on a misconfigured install
    raise SystemExit(
        "fastlora compiles against your installed PyTorch, and none was found.\n"
        "Install torch first (CPU build: pip install torch==2.13.0), then build fastlora with\n"
        "  pip install --no-build-isolation .\n"
        f"(import error: {e})"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def cpp_sources():
    # Every op's schema/composite file in csrc/, the CPU kernels in csrc/cpu/, and the stub
    # Python module (the GPU kernels are Triton, compiled at run time).
    srcs = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    return srcs


class BuildPyWithKernels(build_py):
    """build_py that also installs the Triton sources of kernels/ into fastlora/kernels/."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "fastlora", "kernels")
        self.mkpath(dest)
        for src in sorted(glob.glob(os.path.join(HERE, "kernels", "*.py"))):
            self.copy_file(src, os.path.join(dest, os.path.basename(src)))


debug = os.environ.get("FASTLORA_DEBUG", "0") == "1"
# -fopenmp in both compile and link flags: without it at::parallel_for runs on one thread.
compile_args = ["-O0", "-g"] if debug else ["-O3"]
# -ffp-contract=off: no silent FMA contraction, so the kernels round exactly like the
# reference (bitwise-reproducible sums in aggregation, mass conservation in sparsify).
compile_args += ["-fopenmp", "-ffp-contract=off", "-DPy_LIMITED_API=0x03090000"]

setup(
    name="fastlora",
    packages=find_packages(include=["fastlora", "fastlora.*"]),
    ext_modules=[
        CppExtension(
            "fastlora._C",
            cpp_sources(),
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernels},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
