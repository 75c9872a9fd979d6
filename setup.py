"""Builds the compiled core (``stepmesh._core.core``); everything else is in pyproject.toml.

The core's wire constants are generated from ``src/stepmesh/data/wire.py`` (the
one place the data plane's format is written down) into ``_core/wire.pxi``
before Cython compiles it.
"""

import pathlib
import subprocess
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
WIRE = HERE / "src" / "stepmesh" / "data" / "wire.py"
subprocess.run([sys.executable, str(WIRE), str(HERE / "src" / "stepmesh" / "_core" / "wire.pxi")], check=True)
setup(
    ext_modules=cythonize(
        [
            Extension(
                "stepmesh._core.core",
                ["src/stepmesh/_core/core.pyx"],
                extra_compile_args=["-O2", "-g0", "-Wno-unused-function", "-Wno-unreachable-code"],
            )
        ],
        compiler_directives={"language_level": 3},
    ),
)
