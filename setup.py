"""Builds the Cython kernel. MEDSETTLE_BOUNDSCHECK=1 turns bounds checks back on for debugging."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("MEDSETTLE_BOUNDSCHECK", "") not in ("", "0")
directives = {"boundscheck": debug, "wraparound": debug, "initializedcheck": debug}

# The kernel's modules; each .pxd declares what the others cimport from it.
MODULES = (
    "_memory",   # zeroed table memory in huge pages: the engine's one allocator of its kind
    "_hashing",  # claim ids and accumulator keys to dense ids
    "_tables",   # the compiled policy tables, bound once per policy set
    "_columns",  # Arrow buffers to kernel arrays; outputs and state rows to result columns
    "_kernel",   # the call's passes: row checks, the order, the settlement loop
    "_detail",   # status_detail: the error rows' sentences written into one buffer per batch
)

# The loop is small inline functions (one per step of spec 5.2) that must melt into one
# body: with gcc's default growth limits the largest was left a call (instructions +25 %).
INLINING = ["--param=large-function-growth=1000", "--param=max-inline-insns-single=2000",
            "--param=inline-unit-growth=200", "--param=sra-max-scalarization-size-Ospeed=1024"]

extensions = [
    Extension(
        f"engine.{name}",
        [f"engine/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", *INLINING],
    )
    for name in MODULES
]

# Year-end clearing's per-row hashing (it cimports engine._hashing's hash).
extensions.append(Extension("engine.clearing._buckets", ["engine/clearing/_buckets.pyx"],
                            include_dirs=[numpy.get_include()],
                            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                            extra_compile_args=["-O3"]))

# force: the generated C must follow the directives of this build, not an older one
setup(ext_modules=cythonize(extensions, compiler_directives=directives, language_level=3, force=True))
