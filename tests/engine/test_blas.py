"""engine/_blas.py: importing the engine first leaves NumPy's OpenBLAS one thread (its pool
busy-waits after start and the engine never calls BLAS); a caller's own setting is kept."""
import os
import subprocess
import sys

_THREADS = """
import ctypes, glob, os, sys
import engine, numpy
libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*"))
libs += glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "scipy_openblas*", "lib", "*.so*"))
counts = [getattr(ctypes.CDLL(lib), f)() for lib in libs
          for f in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
          if hasattr(ctypes.CDLL(lib), f)]
print(os.environ["OPENBLAS_NUM_THREADS"], counts[0] if counts else "none")
"""


def _run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if env_value is not None:
        env["OPENBLAS_NUM_THREADS"] = env_value
    return subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_one_blas_thread_unless_the_caller_says():
    setting, threads = _run(None)
    assert setting == "1" and threads in ("1", "none")  # "none": a NumPy without OpenBLAS
    setting, threads = _run("2")
    assert setting == "2" and threads in ("2", "none")
