"""On-disk cache of the suite's expensive intermediate results, keyed by what they depend on.

Two levels, both under ``<cache>/`` (``runs/quality-cache/`` by default, git-ignored):

* ``grads/``: one method's compressed gradients of one workload at one plan seed (float32, as
  ``plan.compress`` returns them, so reloading is lossless), or the ``exact`` method's Gram
  matrices; keyed by the workload's ground-truth hash, the method and the resolved plan configs
  (mask sizes, runs, seeds), so a change of the library's default masks is a new key;
* ``rows/``: the measured LDS row (grid, rules, mislabel AUROC) of that kernel, keyed by the
  gradients' key and the source of the code that turns them into figures (damping rules,
  :mod:`grass_callback.damping`, :mod:`grass_callback.evaluation`).

A key is the SHA-256 of its JSON description; the description is saved beside the value, so a
stale entry is never read under a key it does not match. ``--no-cache`` bypasses both levels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["key_of", "source_hash", "Cache"]


def key_of(description: Any) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_hash(*modules: Any) -> str:
    """Hash of the source files of ``modules`` (a change of the code is a change of the key)."""
    h = hashlib.sha256()
    for mod in modules:
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


class Cache:
    """``get_or_compute(level, description, fn)``: the cached value of ``description`` or ``fn()``."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = 0

    def get_or_compute(self, level: str, description: dict, fn: Callable[[], Any]) -> Any:
        if self.root is None:
            self.misses += 1
            return fn()
        path = self.root / level / f"{key_of(description)}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            if saved.get("description") == json.loads(json.dumps(description, sort_keys=True, default=str)):
                self.hits += 1
                return saved["value"]
        self.misses += 1
        value = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        saved = {"description": json.loads(json.dumps(description, sort_keys=True, default=str)), "value": value}
        torch.save(saved, tmp)
        tmp.replace(path)
        return value
