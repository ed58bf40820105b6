"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/retrain.py --config configs/toy2d_retrain.yaml --set synthetic_ratio=0.5 --json
"""

import sys

from genmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
