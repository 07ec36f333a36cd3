"""SpMV/SpMM benchmark (issue 6); the code lives in bitfuse.sparse.bench (also
`bitfuse bench kernels --suite sparse`)."""

import sys

from bitfuse.sparse.bench import main

if __name__ == "__main__":
    sys.exit(main())
