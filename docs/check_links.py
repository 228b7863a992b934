"""Check every relative link in the README and the docs.

A link must point at a file that exists; a link from a page in ``docs/`` must
also stay inside ``docs/``, because the documentation site is built from that
folder alone (name files elsewhere in the repository as plain text instead).
``mkdocs build --strict`` checks the same, and anchors too; this check needs
nothing but Python.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def problems() -> list[str]:
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            where = f"{page.relative_to(ROOT)}: {target}"
            resolved = (page.parent / target).resolve()
            if not resolved.exists():
                found.append(f"broken link: {where}")
            elif page.parent == DOCS and not resolved.is_relative_to(DOCS):
                found.append(f"link leaves docs/ (the site cannot follow it): {where}")
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
