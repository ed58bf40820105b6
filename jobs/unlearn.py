"""`ray job submit --working-dir . -- python jobs/unlearn.py ARGS` runs `genmem unlearn ARGS` on a cluster; `genmem submit unlearn -- ARGS` also sets storage and tracking."""
import sys

from genmem.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
