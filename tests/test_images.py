"""trainables.data.images: every kind of file that once passed the check and failed (or changed) in training.

Each file is generated here, small, with Pillow or by editing bytes; nothing is downloaded.
"""

import io
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from trainables.data import images
from trainables.data.images import ImageProblem, check_images, load, problem, quoted, resolve

BG = (0, 0, 255)


def save(path, im, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def encoded(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(64, 64)):
    return Image.effect_noise(size, 60).convert("RGB")


def verify_passes(path) -> bool:
    """What the old check ran: Image.verify()."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001
        return False


# --- 1. passed the old check, failed in training -----------------------------------------------

@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "JPEG"])
def test_truncated_file_is_refused(tmp_path, fmt):
    data = encoded(noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    if fmt != "JPEG":  # the kind that slipped through: verify() reads the header only
        assert verify_passes(path)
    with pytest.raises(ImageProblem, match=r"^does not decode: image file is truncated"):
        load(path, BG)


def test_png_with_valid_checksums_but_broken_zlib_stream_is_refused(tmp_path):
    data = bytearray(encoded(noise((128, 128)), "PNG"))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4:at])
    body = bytearray(data[at + 4:at + 4 + length])
    body[length // 2] ^= 0x55
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))  # the chunk's checksum is right again
    path = tmp_path / "zlib.png"
    path.write_bytes(bytes(data[:at + 4]) + bytes(body) + crc + bytes(data[at + 8 + length:]))
    assert verify_passes(path)
    with pytest.raises(zlib.error):
        zlib.decompress(bytes(body))
    assert problem(tmp_path, "zlib.png") == "does not decode: broken data stream when reading image file"


def test_eps_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    path = tmp_path / "page.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
                     b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")
    with Image.open(path) as im:
        assert im.format == "EPS"  # Pillow unrestricted would take it, and run Ghostscript on load
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    with pytest.raises(ImageProblem) as e:
        load(path, BG)
    assert str(e.value) == "is not an image in a supported format (JPEG, PNG, BMP, GIF, TIFF, WEBP)"
    assert ran == []


def test_huge_dimensions_are_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = save(tmp_path / "bomb.png", Image.new("1", (12000, 12000)))
    assert path.stat().st_size < 20_000
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real(self))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageProblem) as e:
            load(path, BG)
    assert str(e.value) == "has 12000 x 12000 = 144,000,000 pixels, over the budget of 67,108,864 (max_pixels)"
    assert decoded == []
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_pixel_budget_is_a_setting_with_an_inclusive_bound(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (100, 100)))
    assert images.MAX_PIXELS == 8192 * 8192
    assert load(tmp_path / "a.png", BG, max_pixels=10_000).size == (100, 100)
    assert problem(tmp_path, "a.png", max_pixels=9_999) == ("has 100 x 100 = 10,000 pixels, over the budget "
                                                            "of 9,999 (max_pixels)")
    assert problem(tmp_path, "a.png", max_pixels=None) is None


def test_jpeg_followed_by_a_video_is_accepted(tmp_path):
    im = Image.new("RGB", (64, 48), (200, 30, 90))
    jpeg = encoded(im, "JPEG", quality=95)
    path = tmp_path / "motion.jpg"
    path.write_bytes(jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64)  # an MP4 after the end marker
    out = load(path, BG)
    assert out.size == (64, 48)
    assert out.tobytes() == Image.open(io.BytesIO(jpeg)).convert("RGB").tobytes()
    assert problem(tmp_path, "motion.jpg") is None


# --- 2. altered silently on load ----------------------------------------------------------------

def test_16_bit_greyscale_keeps_its_top_8_bits(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = np.asarray(load(path, BG))
    assert out.shape == (256, 256, 3)
    assert (out == (values >> 8)[..., None]).all()
    assert tuple(out[40000 // 256, 40000 % 256]) == (40000 >> 8,) * 3  # 156, not saturated 255


def test_16_bit_greyscale_tiff_too(tmp_path):
    path = save(tmp_path / "deep.tif", Image.new("I;16", (4, 4), 40000))
    assert load(path, BG).getpixel((0, 0)) == (156, 156, 156)


def test_exif_orientation_is_applied_to_a_jpeg(tmp_path):
    im = Image.new("RGB", (48, 32), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path / "phone.jpg", im, "JPEG", exif=exif, quality=95)
    out = load(path, BG)
    assert out.size == (32, 48)
    with Image.open(path) as raw:
        assert out.tobytes() == raw.transpose(Image.Transpose.ROTATE_270).tobytes()


def test_exif_orientation_of_a_tiff_is_applied_once(tmp_path):
    # Pillow's TIFF plugin turns the image itself while loading; load must not turn it again.
    im = Image.new("L", (40, 20), 0)
    im.paste(255, (0, 0, 10, 10))
    path = save(tmp_path / "scan.tif", im, tiffinfo={0x0112: 3})  # upside down; kept in the TIFF's own tags
    out = load(path, BG)
    assert out.size == (40, 20)
    assert out.getpixel((35, 15)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (0, 0, 0)


def blend(pixel, background):
    *rgb, a = pixel
    return tuple(round((c * a + b * (255 - a)) / 255) for c, b in zip(rgb, background))


def test_alpha_is_composited_onto_the_background(tmp_path):
    pixels = [(255, 0, 0, 255), (255, 0, 0, 0), (255, 255, 255, 51), (200, 100, 0, 128), (10, 20, 30, 77)]
    im = Image.new("RGBA", (len(pixels), 1))
    im.putdata(pixels)
    out = load(save(tmp_path / "a.png", im), BG)
    assert [out.getpixel((x, 0)) for x in range(len(pixels))] == [blend(p, BG) for p in pixels]
    assert out.getpixel((2, 0)) == (51, 51, 255)


@pytest.mark.parametrize("kind", ["LA", "P-tRNS", "GIF-transparency", "RGB-colour-key"])
def test_every_kind_of_transparency_is_composited(tmp_path, kind):
    if kind == "LA":
        im = Image.new("LA", (2, 1))
        im.putdata([(90, 255), (90, 0)])
        path = save(tmp_path / "la.png", im)
    elif kind == "RGB-colour-key":
        im = Image.new("RGB", (2, 1), (90, 90, 90))
        im.putpixel((1, 0), (1, 2, 3))
        path = save(tmp_path / "key.png", im, transparency=(1, 2, 3))
    else:
        im = Image.new("P", (2, 1))
        im.putpalette([90, 90, 90, 7, 7, 7])
        im.putpixel((1, 0), 1)
        path = save(tmp_path / ("p.gif" if kind.startswith("GIF") else "p.png"), im, transparency=1)
    out = load(path, (10, 200, 30))
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(90, 90, 90), (10, 200, 30)]


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG", "WEBP"])
def test_multi_frame_images_are_refused(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in [(200, 0, 0), (0, 0, 200), (0, 200, 0)]]
    path = save(tmp_path / f"anim.{fmt.lower()}", frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageProblem) as e:
        load(path, BG)
    assert str(e.value) == ("has 3 frames (an animation or a multi-page file): training would see only the "
                            "first; convert it to a single image")


def test_single_frame_gif_loads(tmp_path):
    path = save(tmp_path / "still.gif", Image.new("RGB", (16, 8), (200, 0, 0)))
    out = load(path, BG)
    assert (out.size, out.getpixel((3, 3))) == ((16, 8), (200, 0, 0))


def test_mpo_from_a_phone_gives_its_primary_image(tmp_path):
    primary, preview = Image.new("RGB", (48, 32), (250, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 250))
    path = save(tmp_path / "phone.jpg", primary, "MPO", save_all=True, append_images=[preview], quality=95)
    with Image.open(path) as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    out = load(path, BG)
    assert out.size == (48, 32)
    assert out.getpixel((24, 16))[0] > out.getpixel((24, 16))[2]  # red, the primary; the preview is blue


@pytest.mark.parametrize("mode,value,rgb", [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_plain_modes_convert_exactly(tmp_path, mode, value, rgb):
    out = load(save(tmp_path / "m.png", Image.new(mode, (3, 3), value)), BG)
    assert (out.mode, out.getpixel((1, 1))) == ("RGB", rgb)


def test_palette_and_cmyk_convert_as_pillow_does(tmp_path):
    p = Image.new("P", (2, 2))
    p.putpalette([12, 34, 56])
    assert load(save(tmp_path / "p.png", p), BG).getpixel((0, 0)) == (12, 34, 56)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert load(save(tmp_path / "c.tif", cmyk), BG).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode,value", [("I", 70000), ("F", 0.5)])
def test_32_bit_samples_are_refused(tmp_path, mode, value):
    path = save(tmp_path / "wide.tif", Image.new(mode, (4, 4), value))
    with pytest.raises(ImageProblem, match=rf"^has pixel mode {mode} \(e\.g\. 32-bit"):
        load(path, BG)


# --- 3. paths -----------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    """<tmp>/data/images/{a.png, coco/train2017/b.jpg}, and a real image outside it: <tmp>/data/secret.png."""
    root = tmp_path / "data"
    save(root / "images" / "a.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    save(root / "images" / "coco" / "train2017" / "b.jpg", Image.new("RGB", (8, 8)))
    save(root / "secret.png", Image.new("RGB", (8, 8)))
    return root


def test_a_name_in_a_subfolder_resolves(data):
    assert resolve(data / "images", "coco/train2017/b.jpg") == (data / "images/coco/train2017/b.jpg").resolve()
    assert resolve(data / "images", "coco/../a.png") == (data / "images/a.png").resolve()  # stays inside


def test_an_absolute_name_is_refused_even_into_the_images_folder(data):
    assert (data / "images" / "a.png").is_file()
    assert problem(data / "images", str(data / "images" / "a.png")) == images.OUTSIDE


def test_paths_outside_are_refused_alike_whether_or_not_they_exist(data, tmp_path):
    imgs = data / "images"
    (imgs / "out.png").symlink_to(data / "secret.png")
    (imgs / "gone.png").symlink_to(data / "missing.png")
    (imgs / "up").symlink_to(data, target_is_directory=True)
    names = ["../secret.png", "../missing.png", str(data / "secret.png"), str(data / "missing.png"),
             "out.png", "gone.png", "up/secret.png", "up/missing.png", "coco/../../secret.png"]
    for name in names:
        with pytest.raises(ImageProblem) as e:
            resolve(imgs, name)
        assert str(e.value) == images.OUTSIDE, name
    assert {problem(imgs, n) for n in names} == {images.OUTSIDE}


def test_a_symlinked_images_folder_and_symlinks_within_it_are_allowed(data, tmp_path):
    shared = data / "images"
    other = tmp_path / "copy"
    other.mkdir()
    (other / "images").symlink_to(shared, target_is_directory=True)  # as write_filtered links it
    (shared / "alias.png").symlink_to(shared / "a.png")
    assert resolve(other / "images", "a.png") == shared.resolve() / "a.png"
    assert resolve(other / "images", "alias.png") == shared.resolve() / "a.png"
    assert load(resolve(other / "images", "alias.png"), BG).getpixel((0, 0)) == (1, 2, 3)


def test_missing_folders_and_bad_names_inside(data):
    imgs = data / "images"
    assert problem(imgs, "nope.png") == images.MISSING
    assert problem(imgs, "a.png/x") == images.MISSING
    assert problem(imgs, "coco") == images.NOT_FILE
    assert problem(imgs, "") == images.NAME
    assert problem(imgs, "a\0.png") == images.NAME
    assert problem(imgs, 7) == images.NAME


# --- 4. user strings in error lines -------------------------------------------------------------

def test_quoted_renders_control_characters_as_escapes():
    name = "cat\n\x1b[31mred\u202e.png"
    shown = quoted(name)
    assert shown == repr(name)
    assert shown == r"'cat\n\x1b[31mred\u202e.png'"
    assert all(c.isprintable() for c in shown)
    assert quoted("\udc80.png") == r"'\udc80.png'"  # an undecodable byte: printing it raw would raise
    assert quoted("x" * 300) == repr("x" * 200) + "... (300 characters)"


def test_reasons_never_hold_the_name(data):
    name = "evil\nerror: injected.png"
    save(data / "images" / name, Image.new("RGB", (4, 4)))
    (data / "images" / "trunc\x1b.png").write_bytes(encoded(noise(), "PNG")[:300])
    reasons = check_images(data / "images", [name, "trunc\x1b.png", "\n../x"], processes=1, progress=False)
    assert set(reasons) == {"trunc\x1b.png", "\n../x"}
    assert all("\n" not in r and "\x1b" not in r for r in reasons.values())


# --- check_images: parallel, cached -------------------------------------------------------------

def mixed(root, good=40):
    """A folder with `good` fine images and one of each bad kind; returns (names, expected verdicts)."""
    imgs = root / "images"
    for i in range(good):
        save(imgs / f"g{i:03}.png", Image.new("RGB", (12, 12), (i, 2 * i, 3 * i)))
    data = encoded(noise(), "BMP")
    (imgs / "cut.bmp").write_bytes(data[: len(data) // 2])
    frames = [Image.new("RGB", (8, 8), c) for c in [(9, 9, 9), (99, 99, 99)]]
    save(imgs / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    save(root / "outside.png", Image.new("RGB", (4, 4)))
    expected = {"cut.bmp": "does not decode: image file is truncated (",
                "anim.gif": "has 2 frames", "../outside.png": images.OUTSIDE, "missing.png": images.MISSING}
    names = sorted(p.name for p in imgs.iterdir()) + ["../outside.png", "missing.png", "g000.png"]
    return names, expected


def test_check_images_reports_each_bad_name_once(tmp_path):
    names, expected = mixed(tmp_path)
    reasons = check_images(tmp_path / "images", names, processes=1, progress=False)
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start)


def test_two_processes_give_the_same_verdicts_as_one(tmp_path, monkeypatch):
    names, _ = mixed(tmp_path, good=60)
    one = check_images(tmp_path / "images", names, processes=1, progress=False)
    pids = tmp_path / "pids"
    real = images.load

    def recording(*a, **k):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(images, "load", recording)  # inherited by the forked workers
    two = check_images(tmp_path / "images", names, processes=2, progress=False)
    assert two == one
    seen = pids.read_text().split()
    assert len(seen) == 62  # every distinct file that resolves, once
    assert str(os.getpid()) not in seen and len(set(seen)) == 2


def test_verdicts_are_cached_by_file_fingerprint(tmp_path, monkeypatch):
    names, _ = mixed(tmp_path, good=5)
    imgs, cache = tmp_path / "images", tmp_path / "cache" / "verdicts.json"
    (imgs / "alias.png").symlink_to(imgs / "g001.png")
    names.append("alias.png")
    decoded = []
    real = images.load
    monkeypatch.setattr(images, "load", lambda path, *a, **k: decoded.append(path.name) or real(path, *a, **k))

    first = check_images(imgs, names, processes=1, cache=cache, progress=False)
    assert sorted(decoded) == ["anim.gif", "cut.bmp", "g000.png", "g001.png", "g002.png", "g003.png", "g004.png"]
    stored = json.loads(cache.read_text())["verdicts"]
    assert len(stored) == 7  # by resolved file: the alias shares g001's; missing and outside names are not kept
    assert [p.name for p in cache.parent.iterdir()] == ["verdicts.json"]  # no temporary file left

    decoded.clear()
    assert check_images(imgs, names, processes=1, cache=cache, progress=False) == first
    assert decoded == []

    st = (imgs / "g003.png").stat()
    os.utime(imgs / "g003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    check_images(imgs, names, processes=1, cache=cache, progress=False)
    assert decoded == ["g003.png"]

    decoded.clear()
    tighter = check_images(imgs, names, processes=1, cache=cache, progress=False, max_pixels=100)
    assert len(decoded) == 7  # another budget: other verdicts
    assert tighter["g000.png"] == "has 12 x 12 = 144 pixels, over the budget of 100 (max_pixels)"


def test_an_unreadable_cache_is_replaced(tmp_path, monkeypatch):
    save(tmp_path / "images" / "a.png", Image.new("RGB", (4, 4)))
    cache = tmp_path / "verdicts.json"
    cache.write_text("{not json")
    assert check_images(tmp_path / "images", ["a.png"], processes=1, cache=cache, progress=False) == {}
    assert list(json.loads(cache.read_text())["verdicts"]) == [str((tmp_path / "images" / "a.png").resolve())]


def test_progress_bar_shows_a_rate_on_a_terminal_and_nothing_elsewhere(tmp_path, capsys, monkeypatch):
    """On a terminal, a bar with a rate that clears itself; in a log or a pipe, nothing (stderr then holds
    only what must stay there: one `error:` line on bad input)."""
    import sys

    for i in range(3):
        save(tmp_path / "images" / f"{i}.png", Image.new("RGB", (4, 4)))
    check_images(tmp_path / "images", ["0.png", "1.png", "2.png"], processes=1)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    check_images(tmp_path / "images", ["0.png", "1.png", "2.png"], processes=1)
    out, err = capsys.readouterr()
    assert out == ""
    assert "checking images" in err and "/3 [" in err and "image/s" in err
    assert err.rstrip(" ").endswith("\r"), "the bar is cleared when done"


def test_a_dead_worker_fails_the_check_instead_of_hanging(tmp_path, monkeypatch):
    for i in range(40):
        save(tmp_path / "images" / f"{i}.png", Image.new("RGB", (4, 4)))
    monkeypatch.setattr(images, "load", lambda *a, **k: os._exit(3))  # as a decoder's segfault would
    with pytest.raises(RuntimeError, match="a process checking images died"):
        check_images(tmp_path / "images", [f"{i}.png" for i in range(40)], processes=2, progress=False)


def test_caller_mistakes_are_errors_not_verdicts(tmp_path):
    path = save(tmp_path / "a.png", Image.new("RGBA", (4, 4)))
    with pytest.raises(ValueError, match="background should be"):
        load(path, (0, 0, 256))
    with pytest.raises(ValueError, match="processes should be at least 1"):
        check_images(tmp_path, ["a.png"], processes=0)
