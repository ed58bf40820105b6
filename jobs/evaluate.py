"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --checkpoint CKPT --n 2000 --json
"""

import sys

from genmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
