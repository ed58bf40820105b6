"""The arm table `make demo` printed against the one the README shows: every column but the last
(s/sample, a wall time) must be the same, row by row, so the README cannot drift from what the
demo prints. `make demo` runs it on the demo's output.

    .venv/bin/python examples/demo_table.py demo-output.txt [README.md]

Exits 1 naming each row that differs; where the change is meant, copy the printed table into the
README's "Posterior weight samples" section.
"""

from __future__ import annotations

import sys
from pathlib import Path


def arm_table(text: str) -> list[str]:
    """The arm table's header and rows, each without its last column (s/sample) and with single
    spaces: from the line that starts ``arm`` and names ``scale``, over its dashes, each row an
    arm and its scale (a number), to the first line that is not."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split()[:2] == ["arm", "scale"]), None)
    if start is None or start + 1 >= len(lines) or set(lines[start + 1].strip()) != {"-"}:
        raise ValueError("no arm table (a header 'arm  scale ...' over a line of dashes) in the text")
    rows = [lines[start]]
    for line in lines[start + 2:]:
        if not _is_arm(line):
            break
        rows.append(line)
    return [" ".join(row.split()[:-1]) for row in rows]


def _is_arm(line: str) -> bool:
    cells = line.split()
    try:
        return len(cells) > 2 and float(cells[1]) >= 0
    except ValueError:
        return False


def differences(printed: str, readme: str) -> list[str]:
    """One line per row where the printed table and the README's differ (s/sample aside)."""
    ours, theirs = arm_table(printed), arm_table(readme)
    out = [f"printed: {a}\n README: {b}" for a, b in zip(ours, theirs) if a != b]
    if len(ours) != len(theirs):
        out.append(f"the printed table has {len(ours) - 1} arms, the README's {len(theirs) - 1}")
    return out


def main(argv: list[str]) -> int:
    printed = Path(argv[0]).read_text()
    readme = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = differences(printed, readme)
    if found:
        print("the demo's arm table differs from the README's (s/sample aside):\n" + "\n".join(found)
              + "\nwhere the change is meant, copy the printed table into the README's 'Posterior weight samples' section")
        return 1
    print(f"the demo's arm table is the README's, row by row ({len(arm_table(printed)) - 1} arms; s/sample aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
