"""The docs describe the tree as it is: docs/architecture.md's table names every module once."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_modules() -> list[str]:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where each concept lives"):doc.index("## The graphs")]
    return re.findall(r"`((?:train|export|runtime)/[\w/]+\.py)`", table)


def test_every_module_is_in_the_architecture_table_once():
    modules = sorted(str(p.relative_to(ROOT)) for pkg in ("train", "export", "runtime")
                     for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")
    named = _table_modules()
    assert not [m for m in modules if m not in named], "add a row for these modules"
    assert not sorted({m for m in named if named.count(m) > 1}), "name each module once"
    assert not [m for m in named if m not in modules], "these modules no longer exist"
