"""NumPy's BLAS kept to one thread, before NumPy is first imported (engine/__init__.py imports
this first).

The engine's arithmetic is integer: it never calls BLAS. NumPy's OpenBLAS starts a pool of
threads when it loads, and they busy-wait for work for a while: 0.07-0.1 CPU-s of every
`medsettle settle` run on this 2-core machine, taken from the settling threads
(docs/DECISIONS.md). A value the caller set is kept; a process that imported NumPy before
the engine keeps the pool it has.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
