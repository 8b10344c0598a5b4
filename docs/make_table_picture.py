"""Draw the README's picture of an influence table from the digits demo's local CSV.

    python examples/digits_mlp.py && python docs/make_table_picture.py

Rows are validation images (queries); then their top proponents and opponents from the last
scoring period's ``influence.csv``, each with its (possibly flipped) training label and score.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_mlp import load_digits_split  # noqa: E402

CELL, PAD, TEXT = 72, 6, 30


def main(run: str = "runs/digits", out: str = "docs/influence_table.png", queries: int = 4, per_side: int = 3) -> None:
    periods = sorted((Path(run) / "grass" / "scores").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    lines = (line for line in open(periods[-1] / "influence.csv") if not line.startswith("#"))
    rows = list(csv.DictReader(lines))
    train, val, flipped = load_digits_split(0)
    flipped = set(flipped.tolist())
    qids = list(dict.fromkeys(int(r["query_id"]) for r in rows))[:queries]
    cols = 1 + 2 * per_side
    img = Image.new("RGB", (cols * (CELL + PAD) + PAD, TEXT + queries * (CELL + TEXT + PAD)), "white")
    draw = ImageDraw.Draw(img)
    headers = ["query"] + [f"proponent {i + 1}" for i in range(per_side)] + [f"opponent {i + 1}" for i in range(per_side)]
    for c, h in enumerate(headers):
        draw.text((PAD + c * (CELL + PAD), 8), h, fill="black")

    def tile(pixels, x, y, caption, color="black"):
        arr = (pixels.reshape(8, 8) * 255).clamp(0, 255).byte().numpy()
        img.paste(Image.fromarray(255 - arr).resize((CELL, CELL), Image.NEAREST), (x, y))
        draw.text((x, y + CELL + 2), caption, fill=color)

    for r, q in enumerate(qids):
        y = TEXT + r * (CELL + TEXT + PAD)
        tile(val[q][0], PAD, y, f"val #{q} y={int(val[q][1])}")
        for kind, offset in (("proponent", 1), ("opponent", 1 + per_side)):
            picks = [x for x in rows if int(x["query_id"]) == q and x["kind"] == kind][:per_side]
            for i, x in enumerate(picks):
                t = int(x["train_id"])
                color = "red" if t in flipped else "black"  # red: a label we flipped on purpose
                tile(train[t][0], PAD + (offset + i) * (CELL + PAD), y,
                     f"y={int(train[t][1])} {float(x['score']):+.2g}", color)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
