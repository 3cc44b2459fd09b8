"""`python -m llama_jax.infer`: entry point of the inference CLI and server (code in `infer/`).

Core must not depend on `infer/` at import time; this module is only imported when run.
"""

import sys

from infer.cli import main

if __name__ == "__main__":
    sys.exit(main())
