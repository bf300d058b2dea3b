import os

# numpy's OpenBLAS starts a thread per core at import, each spinning ~0.1 s of CPU waiting for work
# that never comes (the command line calls no BLAS; verify's math runs in torch): 0.11 s of a 2-core
# machine's convert, 1.5 core-seconds on 16 cores.  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    main()
