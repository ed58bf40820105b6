"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/demo.yaml --set scaling.num_workers=2 --json

Under `ray job submit` it attaches to that cluster (RAY_ADDRESS is set for the job's driver);
run alone it starts a local one.
"""

import sys

from genmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
