"""The CPU kernels (src/yuanmoe/quant/csrc/qkernels.c) as an optional C extension: built by
`pip install -e .` with the system C compiler, no PyTorch needed to build it. Where no compiler is
found or the build fails, the install goes on and the quantized modules use the pure-PyTorch path."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "yuanmoe.quant._qkernels", ["src/yuanmoe/quant/csrc/qkernels.c"],
    define_macros=[("YK_PYTHON_MODULE", None)],
    extra_compile_args=["-O3", "-fopenmp", "-std=gnu11"], extra_link_args=["-fopenmp"],
    optional=True)])
