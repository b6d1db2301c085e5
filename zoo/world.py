"""The synthetic image-question world the laptop study trains on.

    python -m zoo.world OUT_DIR      # writes a LLaVA-format dataset directory

Each image holds one to three shapes, each of a distinct colour and shape, in the
cells of a 2 x 2 grid. Questions ask for a colour, a shape, a count or a position,
and the asked-about object is named by an attribute that says nothing about the
answer, so a model that reads only the text cannot beat chance (tests/test_world.py
checks this against the best text-only predictor). Images are rendered at 64 px
and downscaled by the vision tower's processor, so a finer tower sees more.

Object size is the world's lever on resolution (the scaling paper's 224 vs 336 px, direction
2 of docs/REPORT.md). Shapes are 11-17 px of the 64 (OBJECT_PX; 18-26 px in world format 2, where
both towers saw every shape whole): 5-8 px for the 32-px tower, 8-13 px for the 48-px one. One
seed each, LoRA r16 on `1m` at the default budget, `score` at 32 / 48 px with towers pretrained as
zoo.models.VISION_LR says: 18-26 px, 59.3 / 51.7; 11-17 px, 51.7 / 50.0; 8-13 px, 51.0 / 49.7.
Smaller shapes did not make the finer tower win (docs/REPORT.md's direction 2 over 3 seeds).
Before the towers' recipe was fixed, the 32-px tower's pretraining stalled under some thread
counts, and those runs (27-37 at 32 px) had looked like a resolution effect of +6 to +23 points.

The world is written in the same dataset format a researcher brings (DESIGN.md,
"Data"): train.json / eval.json in LLaVA format with images/, captions.json for
stage 1 and text.json (ShareGPT, language-only) for data mixing. Each question record
names its type as `category` (color, shape, count, where; captions: caption), so a
trial's score is also logged per question type. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIDES = {"circle": "zero", "square": "four", "triangle": "three", "diamond": "four"}
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
             "big": "small", "small": "big", "up": "down", "down": "up"}
# Chance accuracy per question type: the number of answers a question of that
# type can have, each equally likely given the question's text.
ANSWER_SPACE = {"color": len(COLORS), "shape": len(SHAPES), "count": 3, "where": len(CELLS)}

RENDER_PX = 64
FORMAT = 3  # of the written dataset (its cache directory's name); 2: records name their type as "category";
#            3: shapes of OBJECT_PX (18-26 px before)
OBJECT_PX = (11, 17)  # an object's size range in pixels of the RENDER_PX image (see the module's docstring)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: int
    size: int  # pixels, before downscaling
    dx: int
    dy: int


def sample_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 3)
    colors = rng.sample(sorted(COLORS), n)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(4), n)
    return [Obj(c, s, cell, rng.randint(*OBJECT_PX), rng.randint(-3, 3), rng.randint(-3, 3))
            for c, s, cell in zip(colors, shapes, cells)]


def render(scene: list[Obj], rng: random.Random) -> Image.Image:
    shade = rng.randint(225, 250)
    img = Image.new("RGB", (RENDER_PX, RENDER_PX), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    half = RENDER_PX // 2
    for o in scene:
        cx = (o.cell % 2) * half + half // 2 + o.dx
        cy = (o.cell // 2) * half + half // 2 + o.dy
        r = o.size // 2
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def caption(scene: list[Obj]) -> str:
    parts = [f"a {o.color} {o.shape} at {CELLS[o.cell]}" for o in scene]
    return f"{NUMBERS[len(scene)]} objects: " + ", ".join(parts) + "."


def ask(scene: list[Obj], rng: random.Random) -> tuple[str, str, str]:
    """(question type, question, answer) about one scene."""
    kind = rng.choice(sorted(ANSWER_SPACE))
    o = rng.choice(scene)
    if kind == "color":
        return kind, f"What color is the {o.shape}?", o.color
    if kind == "shape":
        return kind, f"What shape is the {o.color} object?", o.shape
    if kind == "where":
        return kind, f"Where is the {o.shape}?", CELLS[o.cell]
    return kind, "How many objects are in the image?", NUMBERS[len(scene)]


def text_instruction(rng: random.Random) -> tuple[str, str]:
    """A language-only instruction: facts about the world's own words."""
    kind = rng.randrange(4)
    if kind == 0:
        i = rng.randrange(len(NUMBERS) - 1)
        return f"What number comes after {NUMBERS[i]}?", NUMBERS[i + 1]
    if kind == 1:
        i = rng.randrange(1, len(NUMBERS))
        return f"What number comes before {NUMBERS[i]}?", NUMBERS[i - 1]
    if kind == 2:
        w = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {w}?", OPPOSITES[w]
    s = rng.choice(SHAPES)
    return f"How many sides does a {s} have?", SIDES[s]


def conversation(question: str, answer: str, image: bool) -> list[dict]:
    prompt = f"<image>\n{question}" if image else question
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def grounded_text(rng: random.Random) -> tuple[str, str]:
    """A scene described in words, then a question about it: the LLM zoo's pretraining
    text, so that a pretrained LLM already answers from context and visual tuning only
    has to put the image where the words were."""
    scene = sample_scene(rng)
    _, q, a = ask(scene, rng)
    return f"{caption(scene)}\n{q}", a


def write(out: Path, seed: int = 0, n_train: int = 4000, n_eval: int = 400,
          n_captions: int = 2000, n_text: int = 1000, n_text_eval: int = 200) -> Path:
    """Write the world as a dataset directory; returns `out`. Deterministic by seed."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def image_records(prefix: str, n: int, with_question: bool) -> list[dict]:
        records = []
        for i in range(n):
            scene = sample_scene(rng)
            name = f"{prefix}-{i:06d}.png"
            render(scene, rng).save(out / "images" / name)
            if with_question:
                kind, q, a = ask(scene, rng)
                conv = conversation(q, a, image=True)
            else:
                kind, conv = "caption", conversation("Describe the image briefly.", caption(scene), True)
            records.append({"id": f"{prefix}-{i:06d}", "image": name, "category": kind,
                            "conversations": conv})
        return records

    def text_records(prefix: str, n: int) -> list[dict]:
        return [{"id": f"{prefix}-{i:06d}", "conversations": conversation(*text_instruction(rng), False)}
                for i in range(n)]

    files = {
        "train.json": image_records("train", n_train, True),
        "eval.json": image_records("eval", n_eval, True),
        "captions.json": image_records("cap", n_captions, False),
        "text.json": text_records("text", n_text),
        "text_eval.json": text_records("texteval", n_text_eval),
    }
    for name, records in files.items():
        (out / name).write_text(json.dumps(records, indent=0))
    return out


def main(argv: list[str]) -> int:
    """`python -m zoo.world OUT_DIR`: the world (seed 0, the zoo's) written into OUT_DIR, which must be new or
    empty; anything else is one `error:` line and exit 2, with nothing written.

    A non-empty OUT_DIR is refused, whoever wrote it, rather than written into (it would replace files of the
    same names) or given a subfolder (the path to pass as --data would not be the one typed): the world is
    a pure function of the seed, so a complete one never needs writing again, and an interrupted write
    leaves OUT_DIR as it was, for the world is written into a hidden sibling folder and renamed into place.
    """
    import os
    import shutil
    import tempfile

    if len(argv) != 1 or argv[0].startswith("-"):
        print("error: usage: python -m zoo.world OUT_DIR (a new or empty directory)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and not out.is_dir():
        print(f"error: {out}: is a file; the world is written into a new or empty directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()):
        print(f"error: {out}: is not empty; the world is written only into a new or empty directory, "
              "so that it replaces nothing", file=sys.stderr)
        return 2
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as a folder the user made
        try:
            os.rename(tmp, out)  # replaces an empty OUT_DIR, never a non-empty one
        except OSError as e:
            print(f"error: {out}: {e.strerror} (something was written there meanwhile); nothing was written",
                  file=sys.stderr)
            return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already, unless the write failed
    print(out)
    return 0


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
