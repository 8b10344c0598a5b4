"""Screenshot a table that the digits demo's W&B run holds (the README's pictures).

    python examples/digits_mlp.py && python docs/make_table_picture.py
    python docs/make_table_picture.py --table grass/suspects --out docs/suspects_table.png
    python docs/make_table_picture.py --run runs/digits/wandb/offline-run-...  --rows 16

It reads the run's last ``--table`` (default ``grass/influence``) as W&B will show it (the ``run_table``
artifact's JSON and the PNGs its image cells point to, see ``grass_callback.offline_run``),
writes it as a plain HTML page (one row per table row, the cells as the JSON holds them) and
takes a screenshot with headless Chromium (Debian: ``apt-get install -y chromium``). Nothing is
drawn from the CSV files: the picture shows what W&B holds.
"""

from __future__ import annotations

import argparse
import html
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grass_callback.offline_run import LoggedTable, logged_tables  # noqa: E402

STYLE = """
body { font-family: "DejaVu Sans", sans-serif; font-size: 14px; margin: 16px; color: #222; }
h1 { font-size: 17px; margin: 0 0 4px 0; } p { margin: 0 0 10px 0; color: #555; }
table { border-collapse: collapse; } th { background: #f3f3f5; text-align: left; }
th, td { border: 1px solid #ddd; padding: 3px 10px; vertical-align: middle; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.proponent { color: #1a7f37; } .opponent { color: #b42318; }
"""


def newest_run(root: Path) -> Path:
    runs = sorted((root / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no offline W&B run under {root / 'wandb'}; run examples/digits_mlp.py first")
    return runs[-1]


def cell_html(table: LoggedTable, column: str, value: Any, images: Path) -> str:
    image = table.image_file(value)
    if image is not None:
        name = image.name + ".png"
        shutil.copyfile(image, images / name)
        return f'<td><img src="images/{name}" alt="image"></td>'
    if isinstance(value, float):
        return f'<td class="num">{value:+.4g}</td>'
    if column == "kind":
        return f'<td class="{html.escape(str(value))}">{html.escape(str(value))}</td>'
    return f'<td class="num">{html.escape(str(value))}</td>' if isinstance(value, int) else \
        f"<td>{html.escape(str(value))}</td>"


NOTES = {"grass/influence": "score &gt; 0: training on train_id lowers the query's loss",
         "grass/suspects": "most suspect first: the examples to look at, fix or drop first"}


def page(table: LoggedTable, run: Path, period: int, rows: int, folder: Path, key: str = "grass/influence") -> Path:
    images = folder / "images"
    images.mkdir()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(cell_html(table, c, v, images) for c, v in zip(table.columns, row)) + "</tr>"
                   for row in table.rows[:rows])
    n_images = sum(table.image_file(v) is not None for row in table.rows for v in row)
    text = (f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
            f"<h1>W&amp;B table {html.escape(key)} (logged table {period + 1}, the last)</h1>"
            f"<p>from the run_table artifact of {html.escape(run.name)}: rows 1-{min(rows, len(table.rows))} of "
            f"{len(table.rows)}, {n_images} image cells in all; {NOTES.get(key, '')}</p>"
            f"<table><tr>{head}</tr>{body}</table></body></html>")
    out = folder / "page.html"
    out.write_text(text, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="offline run folder (default: newest in runs/digits)")
    parser.add_argument("--table", default="grass/influence", help="the W&B table's key")
    parser.add_argument("--out", type=Path, default=Path("docs/influence_table.png"))
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--html", type=Path, default=None, help="also keep the HTML page here")
    args = parser.parse_args(argv)
    run = args.run or newest_run(Path("runs/digits"))
    tables = logged_tables(run, args.table)
    if not tables:
        raise SystemExit(f"{run} logged no {args.table} table")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("headless Chromium is needed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp:
        html_page = page(tables[-1], run, len(tables) - 1, args.rows, Path(tmp), args.table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        height = 120 + 105 * min(args.rows, len(tables[-1].rows))
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={args.out.resolve()}", f"--window-size=1100,{height}",
                        html_page.as_uri()], check=True, capture_output=True, timeout=120)
        if args.html is not None:
            shutil.copytree(Path(tmp), args.html, dirs_exist_ok=True)
    print(f"wrote {args.out} from {run}")
    return args.out


if __name__ == "__main__":
    main()
