"""Builds the Cython kernel. MEDSETTLE_BOUNDSCHECK=1 turns bounds checks back on for debugging."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("MEDSETTLE_BOUNDSCHECK", "") not in ("", "0")
directives = {"boundscheck": debug, "wraparound": debug, "initializedcheck": debug}

extensions = [
    Extension(
        "engine._kernel",
        ["engine/_kernel.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
]

# force: the generated C must follow the directives of this build, not an older one
setup(ext_modules=cythonize(extensions, compiler_directives=directives, language_level=3, force=True))
