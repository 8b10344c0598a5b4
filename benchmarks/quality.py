"""Alias of the attribution quality suite (``benchmarks/quality/``): same arguments, same table.

    nice -n 10 .venv/bin/python benchmarks/quality.py        # = python -m benchmarks.quality
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality.run import main  # noqa: E402

if __name__ == "__main__":
    main()
