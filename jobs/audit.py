"""`ray job submit --working-dir . -- python jobs/audit.py ARGS` runs `genmem audit ARGS` on a cluster; `genmem submit audit -- ARGS` also sets storage and tracking."""
import sys

from genmem.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
