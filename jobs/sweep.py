"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --space tune_spaces/mixing_ratio.yaml --job retrain --config configs/digits_retrain.yaml --json
"""

import sys

from genmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
