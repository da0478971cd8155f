"""Shipped YAML configs (task protocols, runs), installed with the package.

`find("tasks", "cityscapes_cil")` returns the shipped file; an existing path is returned as is,
so every ``--tasks``/``--config`` option accepts either a shipped name or a file of your own.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent


def find(kind: str, name_or_path: str | Path) -> Path:
    """Resolve a config given by path or by shipped name (``configs/<kind>/<name>.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_ROOT / kind / f"{Path(str(name_or_path)).stem}.yaml"
    if shipped.is_file() and path.suffix in ("", ".yaml", ".yml") and len(path.parts) == 1:
        return shipped
    available = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped {kind} config "
        f"(shipped: {', '.join(available) or 'none'})"
    )
