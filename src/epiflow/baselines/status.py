"""The baselines status table: one source, two places.

``docs/baselines.md`` holds the table (tool | task | installs on Python 3.11 | runs on the demo |
runs on real data | runtime) between the markers below; README.md's "Baselines" section holds a
copy between the same markers. ``python -m epiflow.baselines.status`` checks that the two agree
(exit 1 and a diff when they do not); ``--write`` copies the docs table into the README.
``tests/test_baselines.py`` runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from ..errors import InputFormatError

START = "<!-- baselines-status:start -->"
END = "<!-- baselines-status:end -->"
COLUMNS = ["tool", "task", "installs on Python 3.11", "runs on the demo", "runs on real data", "runtime"]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def block(text: str, path="") -> str:
    """The text between the markers (exclusive)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise InputFormatError(f"expected one '{START}' ... '{END}' block", path=str(path))
    return text[text.index(START) + len(START):text.index(END)].strip("\n")


def table_rows(text: str) -> list[list[str]]:
    """The markdown table rows of a block (header first, separator dropped), cells stripped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
    return rows


def check(docs: Path, readme: Path) -> list[str]:
    """Diff lines between the two blocks (empty when they agree)."""
    a, b = block(docs.read_text(), docs), block(readme.read_text(), readme)
    return list(difflib.unified_diff(a.splitlines(), b.splitlines(), str(docs), str(readme), lineterm=""))


def write_readme(docs: Path, readme: Path) -> bool:
    """Copy the docs block into the README; True when the README changed."""
    text = readme.read_text()
    old = block(text, readme)
    new = block(docs.read_text(), docs)
    if old == new:
        return False
    i, j = text.index(START) + len(START), text.index(END)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text[:i] + "\n" + new + "\n" + text[j:])
    tmp.replace(readme)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m epiflow.baselines.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default=str(repo_root() / "docs" / "baselines.md"))
    p.add_argument("--readme", default=str(repo_root() / "README.md"))
    p.add_argument("--write", action="store_true", help="copy the docs table into the README")
    a = p.parse_args(argv)
    docs, readme = Path(a.docs), Path(a.readme)
    if a.write:
        print("README updated" if write_readme(docs, readme) else "README already in sync")
        return 0
    diff = check(docs, readme)
    if diff:
        print("\n".join(diff))
        print("the baselines tables differ: run python -m epiflow.baselines.status --write", file=sys.stderr)
        return 1
    print("in sync")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
