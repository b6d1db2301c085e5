"""Dataset validation: every kind of bad record is found and named; the filtered copy keeps the rest."""

import io
import json
from pathlib import Path

import pytest
from conftest import llava_record
from PIL import Image

from trainables import dataset


def rewrite(root: Path, name: str, change) -> None:
    """Apply `change` to the records of `root/name` (a function of the list, editing it in place)."""
    records = json.loads((root / name).read_text())
    change(records)
    (root / name).write_text(json.dumps(records))


def only_problem(report: dataset.Report) -> dataset.Problem:
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_a_valid_dataset_has_no_problems(dataset_dir):
    report = dataset.validate(dataset_dir)
    assert report.ok and report.problems == [] and report.bad_ids == {}
    assert report.counts == {"train.json": 5, "eval.json": 2, "captions.json": 2, "text.json": 2, "text_eval.json": 1}


def turns(*pairs):
    return [{"from": who, "value": value} for who, value in pairs]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("id"), "has no id"),
    (lambda r: r.update(id=None), "has no id"),
    (lambda r: r.update(id=["t1"]), "should be a string"),
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
    (lambda r: r["conversations"][1].update(value=None), "turn 2 has no text value"),
    (lambda r: r["conversations"].__setitem__(1, "a"), "turn 2 is a JSON string"),
    (lambda r: r["conversations"].append({"from": "human", "value": "and?"}), "ends with a human turn"),
    (lambda r: r.pop("image"), "<image> is in its conversation but it has no image field"),
    (lambda r: r["conversations"][0].update(value="What color?"), "no <image> in its first human turn"),
    (lambda r: r["conversations"][0].update(value="<image>\n<image>\nWhat color?"), "<image> appears 2 times"),
    (lambda r: r["conversations"].extend(turns(("human", "<image>\nagain?"), ("gpt", "red"))),
     "<image> appears 2 times"),
    (lambda r: r.update(image=["r0.png", "r1.png"]), "image should be one file name"),
    (lambda r: r.update(image=""), "image should be one file name"),
    (lambda r: r.update(image="nowhere.png"), "image images/nowhere.png does not exist"),
])
def test_each_kind_of_bad_record_is_named(dataset_dir, change, message):
    rewrite(dataset_dir, "train.json", lambda records: change(records[1]))
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.file, p.index) == ("train.json", 1) and message in p.message, p
    rid = json.loads((dataset_dir / "train.json").read_text())[1].get("id")
    assert p.record_id == (rid if isinstance(rid, str) else None)


def test_a_record_that_is_not_an_object(dataset_dir):
    rewrite(dataset_dir, "eval.json", lambda records: records.append(["e9", "what?"]))
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.file, p.record_id, p.index) == ("eval.json", None, 2) and "is a JSON array" in p.message
    assert p.where(dataset_dir).endswith("eval.json record #2")


def test_a_text_only_record_without_image_is_fine_but_text_files_hold_no_images(dataset_dir):
    rewrite(dataset_dir, "text.json", lambda records: records.append(llava_record("x9", image="r0.png")))
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.file, p.record_id) == ("text.json", "x9") and "language-only" in p.message


def test_duplicate_ids_within_a_file(dataset_dir):
    rewrite(dataset_dir, "train.json", lambda records: records.append(dict(records[2])))
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.record_id, p.index) == ("t2", 5) and "duplicate id: record #2 has it too" in p.message
    # the same id in two files is fine: eval and train are separate lists
    rewrite(dataset_dir, "train.json", lambda records: records.pop())
    rewrite(dataset_dir, "eval.json", lambda records: records[0].update(id="t0"))
    assert dataset.validate(dataset_dir).ok


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("garbage.png", b"this is not an image at all", "is not an image file PIL can read"),
    ("empty.png", b"", "is not an image file PIL can read"),
    ("truncated.png", png_bytes()[:60], "does not decode"),
    ("flipped.png", png_bytes()[:-20] + bytes([png_bytes()[-20] ^ 0xFF]) + png_bytes()[-19:], "does not decode"),
    ("truncated.jpg", jpeg_bytes()[: len(jpeg_bytes()) * 2 // 3], "end-of-image marker"),
])
def test_corrupt_images_are_found(dataset_dir, name, content, message):
    (dataset_dir / "images" / name).write_bytes(content)
    rewrite(dataset_dir, "train.json", lambda records: records[3].update(image=name))
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.file, p.record_id) == ("train.json", "t3")
    assert p.message.startswith(f"image images/{name} ") and message in p.message, p.message


def test_a_whole_jpeg_with_padding_after_its_end_is_fine(dataset_dir):
    (dataset_dir / "images" / "padded.jpg").write_bytes(jpeg_bytes() + b"\0" * 100)
    rewrite(dataset_dir, "train.json", lambda records: records[3].update(image="padded.jpg"))
    assert dataset.validate(dataset_dir).ok


def test_each_image_is_checked_once(dataset_dir, monkeypatch):
    seen = []
    real = dataset.image_problem
    monkeypatch.setattr(dataset, "image_problem", lambda path: seen.append(path.name) or real(path))
    report = dataset.validate(dataset_dir, threads=3)
    assert report.ok
    # train, eval and captions all use r0.png and r1.png
    assert sorted(seen) == ["r0.png", "r1.png", "r2.png", "r3.png"]


def test_a_missing_image_is_a_problem_of_every_record_using_it(dataset_dir):
    (dataset_dir / "images" / "r0.png").unlink()
    report = dataset.validate(dataset_dir)
    assert [(p.file, p.record_id) for p in report.problems] == [
        ("train.json", "t0"), ("eval.json", "e0"), ("captions.json", "c0")]
    assert report.bad_ids == {"train.json": {"t0"}, "eval.json": {"e0"}, "captions.json": {"c0"}}


@pytest.mark.parametrize("name, text, message", [
    ("train.json", '[\n  {"id": "a",\n   "conversations": [}\n]', "line 3 column 22: not valid JSON"),
    ("eval.json", "", "line 1 column 1: not valid JSON: Expecting value"),
    ("captions.json", '{"data": []}', "the top level is a JSON object, expected a list of records"),
    ("text.json", '"hello"', "the top level is a JSON string"),
    ("text_eval.json", "\ufeff[]", "line 1 column 1: not valid JSON: Unexpected UTF-8 BOM"),  # read_records fails so
])
def test_a_file_that_does_not_parse_is_fatal(dataset_dir, name, text, message):
    (dataset_dir / name).write_text(text)
    report = dataset.validate(dataset_dir)
    p = only_problem(report)
    assert (p.file, p.record_id, p.index) == (name, None, None) and message in p.message, p.message
    assert report.fatal == [p] and name not in report.counts
    line = report.first_error_line()
    assert line == f"error: {dataset_dir / name}: {p.message}" and "--skip-invalid" not in line
    with pytest.raises(ValueError, match="cannot filter"):
        dataset.write_filtered(dataset_dir, report, dataset_dir.parent / "out")


def test_bytes_that_are_not_utf8(dataset_dir):
    (dataset_dir / "text_eval.json").write_bytes(b'[{"id": "\xff"}]')
    assert "not UTF-8 text" in only_problem(dataset.validate(dataset_dir)).message


def test_train_json_is_required(dataset_dir):
    (dataset_dir / "train.json").unlink()
    p = only_problem(dataset.validate(dataset_dir))
    assert (p.file, p.index) == ("train.json", None) and "does not exist" in p.message


def test_the_first_error_line_names_file_and_record_and_counts_the_rest(dataset_dir):
    (dataset_dir / "images" / "r1.png").write_bytes(b"garbage")

    def break_some(records):
        records[0]["image"] = "x.png"
        records[2]["conversations"].pop()
        records[3].pop("id")
    rewrite(dataset_dir, "train.json", break_some)
    report = dataset.validate(dataset_dir)
    line = report.first_error_line()
    assert line.startswith(f"error: {dataset_dir / 'train.json'} record 't0': image images/x.png does not exist (")
    # r1.png is used by t1, e1 and c1: 6 problems in all, in 6 records
    assert line.endswith("(and 5 more problems; --skip-invalid drops the 6 bad records)"), line
    assert "\n" not in line
    assert report.bad_ids == {"train.json": {"t0", "t1", "t2", "#3"}, "eval.json": {"e1"}, "captions.json": {"c1"}}
    one = dataset.Report(dataset_dir, report.problems[:1])
    assert one.first_error_line().endswith("does not exist (--skip-invalid drops the 1 bad record)")


def test_write_filtered_keeps_the_good_records_and_lists_the_dropped(dataset_dir, tmp_path):
    from trainables.data import read_records

    (dataset_dir / "images" / "r1.png").unlink()
    rewrite(dataset_dir, "train.json", lambda records: records[2].pop("id"))
    report = dataset.validate(dataset_dir)
    out = dataset.write_filtered(dataset_dir, report, tmp_path / "studies" / "data" / report.fingerprint())
    assert [r["id"] for r in read_records(out, "train.json")] == ["t0", "t3", "t-text"]
    assert [r["id"] for r in read_records(out, "eval.json")] == ["e0"]
    for name in ("text.json", "text_eval.json"):  # nothing dropped: the very same bytes
        assert (out / name).read_bytes() == (dataset_dir / name).read_bytes()
    # images are read through the link exactly as trainables.data reads them
    for rec in read_records(out, "train.json") + read_records(out, "captions.json"):
        if "image" in rec:
            Image.open(Path(out) / "images" / rec["image"]).convert("RGB")
    assert (out / "images").is_symlink()
    skipped = json.loads((out / dataset.SKIPPED).read_text())
    assert {(s["file"], s["id"]) for s in skipped} == {("train.json", "t1"), ("train.json", None),
                                                       ("eval.json", "e1"), ("captions.json", "c1")}
    assert all(s["reasons"] for s in skipped)
    # the copy is itself a valid dataset; writing again reuses it; no temporary directory is left behind
    assert dataset.validate(out).ok
    assert dataset.write_filtered(dataset_dir, report, out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert (dataset_dir / "images" / "r0.png").exists()


def test_the_fingerprint_follows_content_and_what_is_dropped(dataset_dir):
    clean = dataset.validate(dataset_dir).fingerprint()
    assert dataset.validate(dataset_dir).fingerprint() == clean
    (dataset_dir / "images" / "r3.png").unlink()  # same JSON, another record dropped
    dropped = dataset.validate(dataset_dir).fingerprint()
    assert dropped != clean
    rewrite(dataset_dir, "text.json", lambda records: records.pop())
    assert dataset.validate(dataset_dir).fingerprint() != dropped


def test_the_synthetic_world_is_valid(zoo_ready):
    world_dir, _ = zoo_ready
    report = dataset.validate(world_dir)
    assert report.ok, report.first_error_line()
    assert report.counts["train.json"] > 1000 and set(report.counts) == set(dataset.FILES)


def write_public_llava(root: Path) -> Path:
    """A dataset as LLaVA-Instruct-150K ships it, written with json and PIL alone (none of our code):
    COCO-style ids and JPEG names, multi-turn conversations, <image> first or last in the
    first human turn, extra keys, and a language-only record among the image ones."""
    (root / "images").mkdir(parents=True)
    for name, color in (("000000033471.jpg", (200, 120, 40)), ("000000052846.jpg", (30, 60, 200))):
        Image.new("RGB", (64, 48), color).save(root / "images" / name, "JPEG", quality=90)
    train = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is on top of the car."}]},
        {"id": "sharegpt-1", "model": "", "conversations": [
            {"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven."}]},
    ]
    (root / "train.json").write_text(json.dumps(train, indent=2))
    return root


def test_a_public_llava_format_dataset_is_valid_and_encodes(tmp_path, zoo_ready):
    from trainables import data as D
    from trainables.config import TrialConfig
    from trainables.model import build_processor

    root = write_public_llava(tmp_path / "llava")
    report = dataset.validate(root)
    assert report.ok, report.first_error_line()
    processor = build_processor(TrialConfig(model_size="0.3m"))
    enc = D.encode(D.read_records(root, "train.json"), processor, root, max_length=512)
    assert enc.ids == ["000000033471", "000000052846", "sharegpt-1"] and enc.too_long == []
    assert enc.image_index == [0, 1, -1] and enc.pixel_values.shape[0] == 2
    assert all((labels != -100).any() for labels in enc.labels)


def test_the_command_line_lists_every_problem(dataset_dir, capsys):
    assert dataset.main([str(dataset_dir)]) == 0
    (dataset_dir / "images" / "r2.png").unlink()
    assert dataset.main([str(dataset_dir)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[-2].endswith("train.json record 't2': image images/r2.png does not exist")
    assert out[-1] == "12 records in train.json, eval.json, captions.json, text.json, text_eval.json: " \
                      "1 problem in 1 record"
