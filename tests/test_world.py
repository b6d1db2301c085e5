import json
from collections import Counter, defaultdict

from zoo import world


def test_world_is_deterministic(tmp_path):
    a = world.write(tmp_path / "a", seed=3, n_train=30, n_eval=10, n_captions=10, n_text=10, n_text_eval=5)
    b = world.write(tmp_path / "b", seed=3, n_train=30, n_eval=10, n_captions=10, n_text=10, n_text_eval=5)
    c = world.write(tmp_path / "c", seed=4, n_train=30, n_eval=10, n_captions=10, n_text=10, n_text_eval=5)
    for name in ("train.json", "eval.json", "captions.json", "text.json", "text_eval.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for img in (a / "images").iterdir():
        assert img.read_bytes() == (b / "images" / img.name).read_bytes()
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()


def test_records_are_llava_format(tmp_path):
    root = world.write(tmp_path, seed=0, n_train=20, n_eval=5, n_captions=5, n_text=5, n_text_eval=5)
    for rec in json.loads((root / "train.json").read_text()):
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and (root / "images" / rec["image"]).is_file()
    for rec in json.loads((root / "text.json").read_text()):
        assert "image" not in rec and "<image>" not in rec["conversations"][0]["value"]


def test_questions_need_the_image(tmp_path):
    """The best any text-only model can do is answer each question text with its most frequent
    training answer (the Bayes-optimal text-only predictor); it must stay within 3 points of chance."""
    root = world.write(tmp_path, seed=1, n_train=4000, n_eval=4000, n_captions=1, n_text=1, n_text_eval=1)
    train = json.loads((root / "train.json").read_text())
    held_out = json.loads((root / "eval.json").read_text())
    answers = defaultdict(Counter)
    for rec in train:
        answers[rec["conversations"][0]["value"]][rec["conversations"][1]["value"]] += 1
    hits = sum(answers[r["conversations"][0]["value"]].most_common(1)[0][0] == r["conversations"][1]["value"]
               for r in held_out if answers[r["conversations"][0]["value"]])
    accuracy = 100 * hits / len(held_out)
    chance = 100 * sum(1 / world.ANSWER_SPACE[r["category"]] for r in held_out) / len(held_out)
    assert accuracy <= chance + 3, (accuracy, chance)
