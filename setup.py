"""Builds the compiled core (``stepmesh._core.core``); everything else is in pyproject.toml.

The core's wire constants are generated from ``src/stepmesh/data/wire.py`` (the
one place the data plane's format is written down) into ``_core/wire.pxi``
before Cython compiles it.
"""

import importlib.util
import pathlib
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
CORE = HERE / "src" / "stepmesh" / "_core"


def _generate_wire_constants() -> None:
    spec = importlib.util.spec_from_file_location("_stepmesh_wire", HERE / "src" / "stepmesh" / "data" / "wire.py")
    wire = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = wire  # dataclasses look their module up there
    spec.loader.exec_module(wire)
    text = wire.cython_constants()
    pxi = CORE / "wire.pxi"
    if not pxi.exists() or pxi.read_text() != text:
        pxi.write_text(text)


_generate_wire_constants()
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
