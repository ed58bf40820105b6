"""`ray job submit --working-dir . -- python jobs/finetune.py ARGS` runs `genmem finetune ARGS` on a cluster; `genmem submit finetune -- ARGS` also sets storage and tracking."""
import sys

from genmem.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
