"""Build hook for the optional compiled quantizers; everything else is in pyproject.toml.

The extension is optional: if it fails to build (no compiler), the package still installs and
the NumPy quantizers (byte-identical, slower) are used.  It is compiled without fused
multiply-add and without fast math, which the byte-exactness with llama.cpp depends on.
"""

import sys
from glob import glob

from setuptools import Extension, setup

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi"]

SOURCES = ["minicpm_convert/quants/_kquants.c", *sorted(glob("minicpm_convert/quants/csrc/*.c"))]

setup(ext_modules=[Extension("minicpm_convert.quants._kquants", SOURCES, depends=glob("minicpm_convert/quants/csrc/*.h"),
                             extra_compile_args=FLAGS, optional=True)])
