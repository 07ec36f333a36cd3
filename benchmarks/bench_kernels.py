"""Kernel microbenchmarks; the code lives in bitfuse.bench_kernels (also `bitfuse bench kernels`)."""

import sys

from bitfuse.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
