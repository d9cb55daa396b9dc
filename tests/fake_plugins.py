"""Build throw-away distributions on sys.path, so the registry is tested through real
entry-point discovery rather than by patching it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

GOOD = """
from prunekit.api import Pruner

class Fixed(Pruner):
    \"\"\"Scores every weight 1.\"\"\"
    name = "{name}"
    contract = 1
    def score(self, target, stats):
        return target.weight.detach().abs() * 0 + 1
"""


def install(
    root: Path, monkeypatch, dist: str, modules: dict[str, str], entries: dict[str, str]
) -> None:
    """Write ``dist`` 1.0 with ``modules`` (name -> source) and pruner ``entries``."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[prunekit.pruners]\n{lines}")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(root))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
