"""docs/ARCHITECTURE.md must stay true: one line for every module of the package, none for a
module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_lists_every_module_once():
    modules = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "mnemosyne").rglob("*.py")
               if p.name != "__init__.py"}
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    listed = re.findall(r"^\| `(mnemosyne/[\w/]+\.py)` \|", text, flags=re.M)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(modules - set(listed)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(listed) - modules) == [], "docs/ARCHITECTURE.md lists modules that do not exist"
