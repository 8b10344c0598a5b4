"""Read back what an offline W&B run holds: its records and the tables it logged, images included.

A ``wandb.Table`` logged to a run travels to W&B as a ``run_table`` artifact: the table JSON
(image cells as ``{"_type": "image-file", "path": "media/images/<hash>.png", ...}``) and the
PNGs it points to. In an offline run the artifact's files wait in W&B's staging folder (under
``WANDB_DATA_DIR``) until ``wandb sync`` uploads them; the run folder's own
``files/media/table/*.table.json`` only holds a text preview (``"Image"`` in image cells). This
module finds the artifact through the run's records (``wandb leet inspect --json``) and returns
the table as W&B will show it.

Example::

    tables = logged_tables("runs/digits/wandb/offline-run-...", "grass/influence")
    table = tables[-1]                       # the last period's
    table.columns, table.rows[0]             # rows as the JSON holds them
    table.image_file(table.rows[0][1])       # the PNG of an image cell on this machine
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_callback.errors import GraSSError

__all__ = ["LoggedTable", "run_records", "logged_tables"]


@dataclass
class LoggedTable:
    """One logged table: ``columns``, ``rows`` (cells as in the W&B JSON) and its media files."""

    key: str
    columns: list[str]
    rows: list[list[Any]]
    media: dict[str, Path] = field(default_factory=dict)  # "media/images/x.png" -> file on disk

    def column(self, name: str) -> list[Any]:
        c = self.columns.index(name)
        return [row[c] for row in self.rows]

    def image_file(self, cell: Any) -> Path | None:
        """The PNG behind an image cell, or None when the cell is not an image."""
        if isinstance(cell, dict) and cell.get("_type") == "image-file":
            return self.media.get(cell["path"])
        return None


def _wandb_exe() -> list[str]:
    exe = Path(sys.executable).with_name("wandb")
    return [str(exe)] if exe.exists() else [shutil.which("wandb") or "wandb"]


def run_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of the offline run in ``run_dir`` (``wandb leet inspect --json``).

    Raises:
        GraSSError: ``run_dir`` is not a run folder, or wandb cannot read it.
    """
    path = Path(run_dir)
    if not any(path.glob("*.wandb")):
        raise GraSSError(f"{path} holds no .wandb file; pass a run folder such as <dir>/wandb/offline-run-...")
    try:
        out = subprocess.run([*_wandb_exe(), "leet", "inspect", "--json", str(path)], capture_output=True,
                             text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GraSSError(f"`wandb leet inspect --json {path}` failed ({exc!r}); wandb >= 0.31 reads offline "
                         "runs this way.") from exc
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def logged_tables(run_dir: str | os.PathLike, key: str,
                  records: list[dict[str, Any]] | None = None) -> list[LoggedTable]:
    """The tables logged under ``key`` (e.g. ``"grass/influence"``), in logging order.

    Raises:
        GraSSError: a table's artifact files are gone (after ``wandb sync`` W&B may clear its
            staging folder; read the run before syncing, or download the artifact).
    """
    records = run_records(run_dir) if records is None else records
    wanted = f"{key}.table.json"
    tables = []
    for record in records:
        artifact = record.get("artifact") if record.get("type") == "artifact" else None
        if not artifact or artifact.get("type") != "run_table":
            continue
        contents = {c["path"]: Path(c["local_path"]) for c in artifact["manifest"]["contents"] if c.get("local_path")}
        if wanted not in contents:
            continue
        if not contents[wanted].exists():
            raise GraSSError(f"the files of table {key!r} ({contents[wanted]}) are gone; read the run before "
                             "`wandb sync`, or download its run_table artifact.")
        data = json.loads(contents[wanted].read_text())
        media = {p: f for p, f in contents.items() if p != wanted}
        tables.append(LoggedTable(key, list(data["columns"]), [list(r) for r in data["data"]], media))
    return tables
