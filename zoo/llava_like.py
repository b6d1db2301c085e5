"""A generated dataset with LLaVA-Instruct-150K's shape: for benchmarks and the cluster-shapes study on a laptop.

    python -m zoo.llava_like OUT_DIR [--records 1000] [--image-size 336] [--seed 0]

What it shares with LLaVA-Instruct-150K (and what the data path must carry): COCO-style
image ids repeated by the several conversations about one image (two per image here, as
150K conversations over ~80K images), JPEG images whose short side is `image-size`
pixels in several aspect ratios (4:3, 3:2, 1:1, portrait), multi-turn conversations of one
to three rounds with the `<image>` placeholder first or last in the first human turn,
long free-text answers (20-120 words, as its detail and reasoning subsets), extra keys, and
no eval.json or captions.json (LLaVA holds its evaluation and its stage-1 pairs elsewhere);
`--eval N` and `--captions N` add them. The content means nothing: it is shapes and words
drawn from a seed, for measuring and running the pipeline, not for learning.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

# (width, height) per unit of the short side: COCO's common aspect ratios.
ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (2, 3))
WORDS = ("the image shows a red blue green yellow purple orange circle square triangle diamond at top bottom left "
         "right of with and there is are in on which appears near large small object objects scene two three one "
         "next to behind background color shape describe this picture it its also".split())
QUESTIONS = ("Describe the image in detail.", "What is happening in this scene?", "What colors can you see?",
             "Where is the largest object?", "Explain what makes this picture unusual.",
             "How many objects are there, and what are they?")


def _image(rng: random.Random, short: int):
    from PIL import Image, ImageDraw

    w, h = rng.choice(ASPECTS)
    size = (short * w // min(w, h), short * h // min(w, h))
    img = Image.new("RGB", size, tuple(rng.randint(180, 250) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        r = rng.randint(short // 12, short // 4)
        box = (x - r, y - r, x + r, y + r)
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def _answer(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
    return " ".join(words).capitalize() + "."


def _conversation(rng: random.Random, image: bool) -> list[dict]:
    turns = []
    for round_ in range(rng.randint(1, 3)):
        question = rng.choice(QUESTIONS)
        if image and round_ == 0:
            question = f"<image>\n{question}" if rng.random() < 0.7 else f"{question}\n<image>"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": _answer(rng)}]
    return turns


def write(out: Path, records: int = 1000, image_size: int = 336, seed: int = 0, eval_records: int = 0,
          captions: int = 0, per_image: int = 2, progress: bool = True) -> Path:
    """Write the dataset into `out` (created; must be empty or absent); returns `out`."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_images = math.ceil((records + eval_records + captions) / per_image)
    names = [f"{i:012d}.jpg" for i in range(n_images)]
    for name in tqdm(names, desc="writing images", unit="image", file=sys.stderr, disable=None if progress else True):
        _image(rng, image_size).save(out / "images" / name, "JPEG", quality=90)

    def image_records(n: int, first: int, caption: bool = False) -> list[dict]:
        recs = []
        for k in range(first, first + n):
            name = names[k // per_image]
            conv = ([{"from": "human", "value": "<image>\nDescribe the image briefly."},
                     {"from": "gpt", "value": _answer(rng)[:120]}] if caption else _conversation(rng, True))
            recs.append({"id": name.removesuffix(".jpg"), "image": name, "conversations": conv, "source": "generated"})
        return recs

    (out / "train.json").write_text(json.dumps(image_records(records, 0)))
    if eval_records:
        ev = image_records(eval_records, records)
        for rec in ev:  # one question, one reference answer: what an eval split holds
            rec["conversations"] = rec["conversations"][:2]
        (out / "eval.json").write_text(json.dumps(ev))
    if captions:
        (out / "captions.json").write_text(json.dumps(image_records(captions, records + eval_records, True)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.llava_like", description=__doc__.splitlines()[0])
    p.add_argument("out", help="an empty or new directory")
    p.add_argument("--records", type=int, default=1000, help="train.json records (default 1000)")
    p.add_argument("--image-size", type=int, default=336, help="short side of the images in pixels (default 336)")
    p.add_argument("--eval", type=int, default=0, help="eval.json records (default none)")
    p.add_argument("--captions", type=int, default=0, help="captions.json pairs (default none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        print(write(Path(args.out), args.records, args.image_size, args.seed, args.eval, args.captions))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
