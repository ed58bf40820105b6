"""`ray job submit --working-dir . -- python jobs/evaluate.py ARGS` runs `genmem evaluate ARGS` on a cluster; `genmem submit evaluate -- ARGS` also sets storage and tracking."""
import sys

from genmem.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
