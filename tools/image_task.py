"""Seeded generator of an image-caption task for vision-language valuation.

Each class is a coloured shape or pattern (red circle, blue square, green triangle,
yellow stripes, purple checkerboard, orange cross, ...) drawn with random position,
size, background and colour jitter; its rows ask the same question about the image
and answer with the class's caption. The ``mislabeled`` variant flips the captions
(and labels) of a fraction of the training rows to another class, for mislabeled-data
detection: the flipped row's text is clean, only the image disagrees with it.

Rows are ``{"id", "image", "prompt", "response", "label", "true_label", "flipped"}``;
``image`` is a PNG path relative to the output folder, so the files can be indexed
with ``--image-column image`` as they are.

Usage::

    python -m tools.image_task --out DIR [--mislabeled 0.2] [--size 56]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from forvalue.storage.files import write_text

PROMPT = "What is shown in the picture? Answer with the colour and the shape."

# (label, caption, colour RGB, shape)
CLASSES = (
    ("red_circle", "a red circle", (220, 30, 30), "circle"),
    ("blue_square", "a blue square", (30, 60, 220), "square"),
    ("green_triangle", "a green triangle", (30, 170, 50), "triangle"),
    ("yellow_stripes", "yellow horizontal stripes", (230, 210, 30), "stripes"),
    ("purple_checkerboard", "a purple checkerboard", (140, 40, 170), "checkerboard"),
    ("orange_cross", "an orange cross", (240, 130, 20), "cross"),
    ("cyan_ring", "a cyan ring", (20, 200, 210), "ring"),
    ("pink_diamond", "a pink diamond", (240, 110, 180), "diamond"),
)


def draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random):
    """One ``size x size`` RGB image of ``shape`` in (jittered) ``colour`` on a random grey background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 170)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "ring":
        pen.ellipse(box, outline=fill, width=max(2, size // 12))
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "stripes":
        step = max(4, size // rng.randint(4, 7))
        for y in range(rng.randint(0, step - 1), size, step):
            pen.rectangle((0, y, size, y + step // 2), fill=fill)
    elif shape == "checkerboard":
        step = max(4, size // rng.randint(3, 6))
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    pen.rectangle((x, y, x + step - 1, y + step - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def generate(
    out: str | Path,
    n_train: int = 20,
    n_test: int = 3,
    n_classes: int = 8,
    size: int = 56,
    noise_rate: float = 0.0,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``OUT/images/*.png``, ``OUT/train.jsonl`` and ``OUT/test.jsonl``.

    Parameters
    ----------
    out : path
        Output folder (created).
    n_train, n_test : int
        Rows per class in each split.
    n_classes : int
        Use the first ``n_classes`` of the 8 classes (at least 2 when flipping).
    size : int
        Image side in pixels.
    noise_rate : float
        Fraction of training rows whose caption and label are replaced by another
        class's (exactly ``round(noise_rate * n_train * n_classes)`` rows); test rows stay clean.
    seed : int
        Equal seeds give identical images and rows.

    Returns
    -------
    (train path, test path)
    """
    if not 1 <= n_classes <= len(CLASSES):
        raise ValueError(f"n_classes must be in [1, {len(CLASSES)}], got {n_classes}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    classes = CLASSES[:n_classes]
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for c, (label, caption, colour, shape) in enumerate(classes):
        rng = random.Random(f"{seed}:image:{c}")
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                name = f"images/{split}-{label}-{i}.png"
                draw(shape, colour, size, rng).save(out / name)
                splits[split].append(
                    {
                        "id": f"{split}-{label}-{i}",
                        "image": name,
                        "prompt": PROMPT,
                        "response": caption,
                        "label": label,
                        "true_label": label,
                        "flipped": False,
                    }
                )
    k = round(noise_rate * len(splits["train"]))
    if k and n_classes < 2:
        raise ValueError("flipping captions needs n_classes >= 2")
    rng = random.Random(f"{seed}:image:flip")
    for idx in sorted(rng.sample(range(len(splits["train"])), k)):
        row = splits["train"][idx]
        label, caption, _, _ = rng.choice([cls for cls in classes if cls[0] != row["true_label"]])
        row.update(label=label, response=caption, flipped=True)
    paths = []
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-train", type=int, default=20, help="training rows per class")
    ap.add_argument("--n-test", type=int, default=3, help="test rows per class")
    ap.add_argument("--n-classes", type=int, default=len(CLASSES))
    ap.add_argument("--size", type=int, default=56, help="image side in pixels")
    ap.add_argument(
        "--mislabeled", type=float, default=0.0, metavar="RATE", help="fraction of training captions flipped"
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for path in generate(a.out, a.n_train, a.n_test, a.n_classes, a.size, a.mislabeled, a.seed):
        print(path, sum(1 for _ in path.open()))


if __name__ == "__main__":
    main()
