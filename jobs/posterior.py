"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/posterior.py --checkpoint CKPT --method euclidean riemannian --samples 4 --scale 0.01 0.03 --json
"""

import sys

from genmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["posterior", *sys.argv[1:]]))
