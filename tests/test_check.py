"""The dataset check before Ray starts: every kind of bad record named, the files a recipe needs, and a promise:
what it passes is what trials read (the shards it writes), nothing else."""

import io
import json
import os
from pathlib import Path

import pytest
from conftest import llava_record
from PIL import Image

from trainables.config import TrialConfig
from trainables.data import records
from trainables.data.check import HOLDOUT_MAX, held_out
from trainables.data.shards import Shard
from trainables.prepare import prepare

SMALL = TrialConfig(model_size="0.3m")


def check(root: Path, tmp: Path, configs=(SMALL,), **kw):
    return prepare(root, list(configs), kw.pop("storage", tmp / "storage"), progress=False, **kw)


def rewrite(root: Path, name: str, change) -> None:
    """Apply `change` to the records of `root/name` (a function of the list, editing it in place)."""
    recs = json.loads((root / name).read_text())
    change(recs)
    (root / name).write_text(json.dumps(recs))


def only_problem(report) -> records.Problem:
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_a_valid_dataset_has_no_problems_and_its_shards_hold_every_record(dataset_dir, tmp_path):
    report, plan = check(dataset_dir, tmp_path)
    assert report.ok and plan is not None, report.problems
    assert report.counts == {"train.json": 5, "eval.json": 2, "captions.json": 2, "text.json": 2, "text_eval.json": 1}
    (splits,) = plan.splits.values()
    assert {name: (s.rows, s.dropped) for name, s in splits.items()} == {
        "train": (5, ()), "eval": (2, ()), "captions": (2, ()), "text": (2, ()), "text_eval": (1, ())}
    assert [Shard(splits["train"].shard).record_id(i) for i in range(5)] == ["t0", "t1", "t2", "t3", "t-text"]


def turns(*pairs):
    return [{"from": who, "value": value} for who, value in pairs]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("id"), "has no id"),
    (lambda r: r.update(id=None), "has no id"),
    (lambda r: r.update(id=["t1"]), "should be a string or an integer"),
    (lambda r: r.update(id=1.5), "should be a string or an integer"),
    (lambda r: r.pop("conversations"), "has no conversations"),
    (lambda r: r.update(conversations=[]), "non-empty list of turns"),
    (lambda r: r.update(conversations=turns(("human", "<image>\nq"), ("human", "q"))),
     "turn 2 is from 'human' where 'gpt' belongs"),
    (lambda r: r.update(conversations=turns(("gpt", "<image>\nhello"), ("human", "q"), ("gpt", "a"))),
     "turn 1 is from 'gpt' where 'human' belongs"),
    (lambda r: r.update(conversations=turns(("system", "be brief"), ("human", "<image>\nq"), ("gpt", "a"))),
     "turn 1 is from 'system', expected one of ['gpt', 'human']"),
    (lambda r: r.update(conversations=turns(("user", "<image>\nq"), ("assistant", "a"))), "turn 1 is from 'user'"),
    (lambda r: r["conversations"][1].pop("value"), "turn 2 has no text value"),
    (lambda r: r["conversations"].__setitem__(1, "a"), "turn 2 is a JSON string"),
    (lambda r: r["conversations"].append({"from": "human", "value": "and?"}), "ends with a human turn"),
    (lambda r: r.pop("image"), "<image> is in its conversation but it has no image field"),
    (lambda r: r["conversations"][0].update(value="What color?"), "no <image> in its first human turn"),
    (lambda r: r["conversations"][0].update(value="<image>\n<image>\nWhat color?"), "<image> appears 2 times"),
    (lambda r: r.update(image=["r0.png", "r1.png"]), "image should be one file name"),
    (lambda r: r.update(image="nowhere.png"), "image 'nowhere.png' does not exist"),
    (lambda r: r.update(category=3), "category should name the question's type in 1 to 64 printable characters, "
                                     "a letter or digit among them, got a JSON number"),
    (lambda r: r.update(category=" "), "category should name the question's type"),
    (lambda r: r.update(category=".."), "a letter or digit among them, got '..'"),
    (lambda r: r.update(category="x" * 65), "category should name the question's type"),
    (lambda r: r.update(category="color\nshape"), r"got 'color\nshape'"),
])
def test_each_kind_of_bad_record_is_named(dataset_dir, tmp_path, change, message):
    rewrite(dataset_dir, "train.json", lambda recs: change(recs[1]))
    report, plan = check(dataset_dir, tmp_path)
    p = only_problem(report)
    assert plan is None and (p.file, p.index) == ("train.json", 1) and message in p.message, p
    rid = json.loads((dataset_dir / "train.json").read_text())[1].get("id")
    assert p.record_id == (rid if isinstance(rid, str) else None)


def test_ids_repeat_and_may_be_numbers_kept_as_strings(dataset_dir, tmp_path):
    """LLaVA-Instruct-150K gives one COCO image several conversations under the image's id."""
    def llava_instruct_ids(recs):
        recs[0]["id"], recs[1]["id"], recs[2]["id"] = 33471, "000000033471", 33471
        recs[1]["image"] = recs[2]["image"] = recs[0]["image"]
    rewrite(dataset_dir, "train.json", llava_instruct_ids)
    report, plan = check(dataset_dir, tmp_path)
    assert report.ok, report.problems
    shard = Shard(plan.split(next(iter(plan.splits)), "train").shard)
    assert [shard.record_id(i) for i in range(3)] == ["33471", "000000033471", "33471"]


def test_a_text_file_holds_no_images(dataset_dir, tmp_path):
    rewrite(dataset_dir, "text.json", lambda recs: recs.append(llava_record("x9", image="r0.png")))
    p = only_problem(check(dataset_dir, tmp_path)[0])
    assert (p.file, p.record_id) == ("text.json", "x9") and "language-only" in p.message


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("garbage.png", b"this is not an image at all", "is not an image in a supported format"),
    ("truncated.png", png_bytes()[:60], "does not decode"),
    ("shape.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "is not an image in a supported format"),
])
def test_an_image_training_could_not_decode_is_refused_naming_the_record(dataset_dir, tmp_path, name, content,
                                                                          message):
    (dataset_dir / "images" / name).write_bytes(content)
    rewrite(dataset_dir, "train.json", lambda recs: recs[3].update(image=name))
    p = only_problem(check(dataset_dir, tmp_path)[0])
    assert (p.file, p.record_id) == ("train.json", "t3")
    assert p.message.startswith(f"image {name!r} ") and message in p.message, p.message


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "link.png", "../missing.png"])
def test_an_image_outside_the_dataset_is_refused_without_saying_whether_it_exists(dataset_dir, tmp_path, name):
    Image.new("RGB", (8, 8)).save(dataset_dir / "outside.png")  # beside images/, inside the dataset dir
    (dataset_dir / "images" / "link.png").symlink_to(dataset_dir / "outside.png")
    rewrite(dataset_dir, "train.json", lambda recs: recs[3].update(image=name))
    p = only_problem(check(dataset_dir, tmp_path)[0])
    assert p.message == f"image {name!r} is outside the dataset's images folder (an absolute path, or '..' or a " \
                        "symlink leading out)"


def test_an_images_folder_that_is_a_link_to_shared_storage_is_fine(dataset_dir, tmp_path):
    shared = tmp_path / "nfs" / "coco"
    (dataset_dir / "images").rename(shared.parent.mkdir(parents=True) or shared)
    (dataset_dir / "images").symlink_to(shared, target_is_directory=True)
    assert check(dataset_dir, tmp_path)[0].ok


def test_names_are_escaped_in_the_error_line(dataset_dir, tmp_path):
    rewrite(dataset_dir, "train.json", lambda recs: recs[0].update(id="evil\n\x1b[31mred", image="a\nb.png"))
    report, _ = check(dataset_dir, tmp_path)
    line = report.first_error_line()
    assert "\n" not in line and "\x1b" not in line
    assert "record 'evil\\n\\x1b[31mred': image 'a\\nb.png' does not exist" in line


def test_deeply_nested_json_is_one_problem_not_a_traceback(dataset_dir, tmp_path):
    (dataset_dir / "eval.json").write_text("[" * 100_000 + "]" * 100_000)
    p = only_problem(check(dataset_dir, tmp_path)[0])
    assert (p.file, p.index) == ("eval.json", None) and "nested too deeply" in p.message


@pytest.mark.parametrize("name, text, message", [
    ("train.json", '[\n  {"id": "a",\n   "conversations": [}\n]', "line 3 column 22: not valid JSON"),
    ("captions.json", '{"data": []}', "the top level is a JSON object, expected a list of records"),
    ("text_eval.json", "\ufeff[]", "line 1 column 1: not valid JSON: Unexpected UTF-8 BOM"),
])
def test_a_file_that_does_not_parse_is_fatal_even_with_skip_invalid(dataset_dir, tmp_path, name, text, message):
    (dataset_dir / name).write_text(text)
    report, plan = check(dataset_dir, tmp_path, skip_invalid=True)
    p = only_problem(report)
    assert plan is None and (p.file, p.record_id, p.index) == (name, None, None) and message in p.message
    line = report.first_error_line()
    assert line == f"error: {dataset_dir / name}: {p.message}" and "--skip-invalid" not in line


def test_a_record_too_long_for_the_trials_is_refused_before_any_trial(dataset_dir, tmp_path):
    long_answer = " ".join(["red"] * 200)
    rewrite(dataset_dir, "train.json", lambda recs: recs[2]["conversations"].__setitem__(
        0, {"from": "human", "value": "<image>\n" + "Describe it. " * 60}))
    rewrite(dataset_dir, "eval.json", lambda recs: recs[1]["conversations"][0].update(value="<image>\n" + long_answer))
    report, plan = check(dataset_dir, tmp_path, configs=[SMALL, TrialConfig(image_size=48)])
    assert plan is None
    problems = {(p.file, p.record_id): p.message for p in report.problems}
    assert set(problems) == {("train.json", "t2"), ("eval.json", "e1")}
    # the worst case of the space: the 48-px tower's 36 image tokens, max_length 128
    assert "none of its answer tokens fits within max_length=128 (model_size 0.3m/1m)" in problems["train.json", "t2"]
    assert "(36 image tokens), over max_length=128 (a prompt is never cut)" in problems["eval.json", "e1"]
    report, plan = check(dataset_dir, tmp_path, configs=[SMALL, TrialConfig(image_size=48)], skip_invalid=True)
    (splits,) = plan.splits.values()
    assert splits["train"].dropped == (2,) and splits["eval"].dropped == (1,)
    assert {s["id"] for s in report.skipped()} == {"t2", "e1"}


def test_without_eval_json_a_seeded_share_of_train_is_held_out_by_image(dataset_dir, tmp_path):
    (dataset_dir / "eval.json").unlink()
    report, plan = check(dataset_dir, tmp_path)
    (splits,) = plan.splits.values()
    held = set(Shard(splits["eval"].shard).record_id(i) for i in range(splits["eval"].rows))
    trained = {Shard(splits["train"].shard).record_id(r) for r in range(splits["train"].rows)
               if r not in splits["train"].dropped}
    assert held and not held & trained and len(held) + len(trained) == 5
    assert plan.holdout == len(held) and any("held out as the eval split" in n for n in report.notes)
    assert check(dataset_dir, tmp_path)[1] == plan, "the same share every time (seeded)"


def test_held_out_records_keep_an_image_on_one_side():
    train = [{"image": f"{i // 3}.jpg"} for i in range(3000)]  # three conversations per image, as LLaVA-Instruct
    chosen = held_out(train, list(range(3000)), seed=0)
    images = {train[i]["image"] for i in chosen}
    assert chosen == {i for i in range(3000) if train[i]["image"] in images}
    assert 150 <= len(chosen) <= 152 and held_out(train, list(range(3000)), seed=0) == chosen
    assert len(held_out([{"image": f"{i}.jpg"} for i in range(100_000)], list(range(100_000)), 0)) == HOLDOUT_MAX


def test_without_caption_pairs_stage_1_is_skipped_and_said_or_taken_from_another_dataset(dataset_dir, tmp_path):
    captions = (dataset_dir / "captions.json").read_text()
    (dataset_dir / "captions.json").unlink()
    report, plan = check(dataset_dir, tmp_path)
    assert plan.stage1 == "" and "stage 1 is skipped" in " ".join(report.notes)
    lcs = tmp_path / "lcs-558k"
    (lcs / "images").mkdir(parents=True)
    for png in (dataset_dir / "images").iterdir():
        os.link(png, lcs / "images" / png.name)
    (lcs / "train.json").write_text(captions)  # LCS-558K ships its pairs as one LLaVA-format file
    report, plan = check(dataset_dir, tmp_path, stage1=lcs)
    assert plan.stage1 == str(lcs / "train.json") and report.ok
    (splits,) = plan.splits.values()
    assert splits["captions"].images == str(lcs / "images") and splits["captions"].rows == 2
    (lcs / "images" / "r1.png").unlink()
    p = only_problem(check(dataset_dir, tmp_path, stage1=lcs)[0])
    assert p.where(dataset_dir) == f"{lcs / 'train.json'} record 'c1'" and "does not exist" in p.message


def test_a_dry_run_writes_no_shard_and_a_second_check_reuses_the_first(dataset_dir, tmp_path):
    report, plan = check(dataset_dir, tmp_path, write=False)
    assert plan is not None and not (tmp_path / "storage").exists()
    check(dataset_dir, tmp_path)
    shards = sorted((tmp_path / "storage" / "shards").iterdir())
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert check(dataset_dir, tmp_path)[0].ok and [p.stat().st_mtime_ns for p in shards] == stamps


def test_the_synthetic_world_passes(world_data):
    assert world_data.used("train") == 4000 and world_data.used("eval") == 400 and world_data.stage1


def write_public_llava(root: Path) -> Path:
    """A dataset as LLaVA-Instruct-150K ships it, written with json and PIL alone (none of our code):
    COCO-style ids and JPEG names, multi-turn conversations, <image> first or last in the first human
    turn, extra keys, a language-only record among the image ones, and no eval.json nor captions.json."""
    (root / "images").mkdir(parents=True)
    for name, color in (("000000033471.jpg", (200, 120, 40)), ("000000052846.jpg", (30, 60, 200))):
        Image.new("RGB", (64, 48), color).save(root / "images" / name, "JPEG", quality=90)
    train = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "What is the bus doing?\n<image>"},
            {"from": "gpt", "value": "It waits at a stop."}]},
        {"id": 52846, "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is on top of the car."}]},
        {"id": "sharegpt-1", "model": "", "conversations": [
            {"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven."}]},
    ]
    (root / "train.json").write_text(json.dumps(train, indent=2))
    return root


def test_a_public_llava_format_dataset_passes_and_trains(tmp_path, zoo_ready):
    root = write_public_llava(tmp_path / "llava")
    report, plan = check(root, tmp_path, configs=[TrialConfig(model_size="0.3m", max_length=512)])
    assert report.ok, report.first_error_line()
    assert plan.holdout >= 1 and plan.stage1 == ""
    (splits,) = plan.splits.values()
    assert splits["train"].used + splits["eval"].used == 4


def test_the_command_line_lists_every_problem(dataset_dir, capsys):
    from trainables.prepare import main

    assert main([str(dataset_dir)]) == 0
    (dataset_dir / "images" / "r2.png").unlink()
    assert main([str(dataset_dir)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[-2].endswith("train.json record 't2': image 'r2.png' does not exist")
    assert out[-1] == "12 records in train.json, eval.json, captions.json, text.json, text_eval.json: " \
                      "1 problem in 1 record"
