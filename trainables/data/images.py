"""A LLaVA-format dataset's image files: found safely, decoded faithfully, checked by the code training runs.

A record's `image` names a file under `<root>/images/` (subfolders allowed; `images/`
itself may be a symlink to shared storage). The dataset check is a promise: every image
it passes, training decodes, because both call the same two functions:

    resolve(images_root, name) -> Path
        The file `name` leads to, fully resolved, inside `images_root` (resolved first, so
        it may live anywhere). Refused with ImageProblem: a non-string or empty name or one
        with a NUL (NAME); an absolute path (even one into images/: names are relative),
        or a `..` or a symlink (the file or any folder on the way) that leads outside
        (OUTSIDE: one message whether or not the target exists, so the check cannot be
        used to probe the file system); a name inside that does not exist (MISSING) or is
        not a regular file (NOT_FILE).

    load(path, background, max_pixels=MAX_PIXELS) -> PIL.Image.Image
        The image at `path` fully decoded, mode RGB, `size` as displayed (width, height in
        pixels, after the EXIF orientation). Refused with ImageProblem: a format outside
        FORMATS; more than `max_pixels` pixels (width * height, read from the header
        before anything is decoded; None: no budget of ours, Pillow's own
        Image.MAX_IMAGE_PIXELS limit still applies); more than one frame (an animated
        GIF/PNG/WebP, a multi-page TIFF: training would see the first frame only); any
        error while decoding (truncated data, a broken zlib stream); a pixel mode with no
        faithful 8-bit RGB rendering (I, F, LAB, ...). Conversion, see `_rgb`: 16-bit
        greyscale keeps its top 8 bits (v >> 8, as Pillow already does for 16-bit RGB),
        anything with transparency is composited onto `background` (an (r, g, b) tuple of
        0..255: training's pad colour), and the EXIF orientation is applied.

    problem(images_root, name, background=CHECK_BACKGROUND, max_pixels=MAX_PIXELS) -> str | None
        The check's verdict for one image: None, or the ImageProblem's reason.

    check_images(images_root, names, processes=None, cache=None, progress=True,
                 max_pixels=MAX_PIXELS) -> dict[str, str]
        {name: reason} for the names that fail `problem`, over distinct names, decoding
        in parallel across processes, with a progress bar and a verdict cache.

    quoted(value, limit=QUOTE_LIMIT) -> str
        A user string (a file name, an id) for one `error:` line: repr-escaped, so a
        newline, an escape sequence or a bidi control prints as its escape, and capped.

A reason (ImageProblem's message, `problem`'s and `check_images`' values) is one line
completing "image <name> ...", e.g. "does not decode: image file is truncated (...)"; it
never holds the name or path, so callers render the name with `quoted` themselves.

Everything here relies on Pillow's defaults that the rest of the code must leave alone:
ImageFile.LOAD_TRUNCATED_IMAGES False (else truncated files load with grey fill) and
Image.MAX_IMAGE_PIXELS (both enter the cache's settings, so changing them invalidates it).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import numbers
import os
import stat
import sys
import tempfile
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import PIL
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats Pillow may open: the raster formats datasets use, decoded by libraries linked into Pillow;
# not EPS/PDF/PS (Pillow runs Ghostscript on them: an external program on untrusted files)
# nor the many rare formats Pillow would otherwise sniff (ICNS, PCX, SGI, ...).
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# Pillow opens a JPEG carrying an MP (multi-picture) index, as many phones write, as MPO
# through the JPEG opener. Its first frame is the primary image by the CIPA DC-007 spec;
# the others are previews or a stereo pair, so MPO is exempt from the one-frame rule.
PRIMARY_FIRST = ("MPO",)
# 2**26 = 8192 x 8192: above the 48-50 MP of today's phone cameras and below Pillow's own
# 89.5 MP warning. Decoding the largest allowed image takes ~0.5-2 s and ~200 MB (RGB) per
# DataLoader worker; LLaVA resizes every image to 336 x 336, so more pixels add nothing.
MAX_PIXELS = 2**26
# The check only asks whether an image decodes; the composite colour cannot change that.
CHECK_BACKGROUND = (0, 0, 0)
QUOTE_LIMIT = 200  # characters of a user string shown in an error line
# Part of the cache's settings: bump when `load` accepts or refuses differently.
FORMAT_VERSION = 1

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes Pillow's convert() maps to RGB(A) without losing meaning (CMYK: naively, without an
# ICC profile, as every LLaVA loader does). I and F are 32-bit with no defined 8-bit scale.
CONVERTIBLE = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LA", "PA", "RGBA", "RGBa")

NAME = "is not a usable file name (not a non-empty string, or holds a NUL character)"
OUTSIDE = "is outside the dataset's images folder (an absolute path, or '..' or a symlink leading out)"
MISSING = "does not exist"
NOT_FILE = "is not a regular file"

PARALLEL_FROM = 32        # files to decode below which a process pool costs more than it saves
CHUNK = 64                # images per task: few tasks for a million images, yet a live bar
TASKS_PER_PROCESS = 4     # at least this many tasks per process, so a slow chunk does not idle the rest


class ImageProblem(ValueError):
    """Why an image is refused: one line, to follow "image <quoted name> ", no user strings in it."""


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`value` as one safe line: repr() escapes newlines, ANSI escapes, bidi controls and lone
    surrogates (from undecodable file names), and quotes it; past `limit` characters it is cut."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)  # not a string (a number from JSON, say): its repr, cut the same way
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str, limit: int = QUOTE_LIMIT) -> str:
    """A library's message made safe for one line: unprintable characters escaped as repr would
    (by hand: repr would also quote the text and escape its quotes, which read badly mid-sentence)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown if len(text) <= limit else shown + "..."


def resolve(images_root: Path, name: str) -> Path:
    """The regular file `name` leads to inside `images_root`, fully resolved; or ImageProblem."""
    return _locate(os.path.realpath(images_root), name)[0]


def _locate(root: str, name) -> tuple[Path, os.stat_result]:
    """resolve() for an already resolved `root`, with the file's stat (the cache's fingerprint)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ImageProblem(NAME)
    # A record names a file relative to images/, so the dataset can move; refused before
    # touching the disk, even when it points inside, so whether it exists cannot matter.
    if os.path.isabs(name):
        raise ImageProblem(OUTSIDE)
    # Non-strict realpath resolves every symlink that exists and every '..' after it, as
    # open() would; a link to a missing file outside resolves outside too, so the refusal
    # is the same whether or not the target exists. '..' that stays inside is harmless.
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        raise ImageProblem(OUTSIDE)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageProblem(MISSING) from None
    except OSError as e:
        raise ImageProblem(f"cannot be read: {_one_line(e.strerror or type(e).__name__)}") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, or a FIFO that would block the reader forever
        raise ImageProblem(NOT_FILE)
    return Path(target), st


def load(path: Path, background: tuple[int, int, int], max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image at `path`, fully decoded, mode RGB, upright (EXIF orientation applied); or ImageProblem.

    `background`: (r, g, b), 0..255, what transparent pixels are composited onto.
    `max_pixels`: the most width * height pixels accepted, from the header, before decoding.
    """
    if len(background) != 3 or not all(isinstance(c, numbers.Integral) and 0 <= c <= 255 for c in background):
        # A caller's bug, not the image's: raised as such, never turned into a verdict.
        raise ValueError(f"background should be (r, g, b) in 0..255, got {background!r}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageProblem(f"cannot be read: {_one_line(e.strerror or type(e).__name__)}") from None
    # An open file, not a path: Pillow then leaves the decoded pixels usable after the file closes.
    with f:
        try:
            with warnings.catch_warnings():
                # Our own budget below decides; Pillow's warning would repeat it on stderr.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f, formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageProblem(f"is not an image in a supported format ({', '.join(FORMATS)})") from None
        except Image.DecompressionBombError as e:
            raise ImageProblem(f"has too many pixels for Pillow's limit: {_one_line(str(e))}") from None
        except Exception as e:  # noqa: BLE001 - header parsers raise anything (SyntaxError, struct.error)
            raise ImageProblem(f"does not decode: {_reason(e)}") from None
        if im.format not in FORMATS + PRIMARY_FIRST:  # a factory may return another plugin's class
            raise ImageProblem(f"is not an image in a supported format ({', '.join(FORMATS)})")
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageProblem(f"has {width} x {height} = {width * height:,} pixels, over the budget of "
                               f"{max_pixels:,} (max_pixels)")
        try:
            frames = getattr(im, "n_frames", 1)
        except Exception as e:  # noqa: BLE001 - counting walks the file (GIF blocks, TIFF IFDs): may be broken
            raise ImageProblem(f"does not decode: {_reason(e)}") from None
        if frames > 1 and im.format not in PRIMARY_FIRST:
            raise ImageProblem(f"has {frames} frames (an animation or a multi-page file): training would "
                               "see only the first; convert it to a single image")
        try:
            im.load()
            # In place: no copy of the pixels. (Pillow's TIFF plugin already applies its
            # orientation tag while loading, and drops it, so nothing is turned twice.)
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, zlib/struct errors, EOFError, ...
            raise ImageProblem(f"does not decode: {_reason(e)}") from None
        try:
            return _rgb(im, background)
        except ImageProblem:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError: training's conversion would fail alike
            raise ImageProblem(f"does not convert to RGB: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    message = str(e) if not isinstance(e, OSError) or e.strerror is None else e.strerror  # never a path
    return _one_line(message or type(e).__name__)


def _rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`im` as RGB, faithfully, or ImageProblem."""
    mode = im.mode
    if mode in SIXTEEN_BIT:
        if "transparency" in im.info:
            # The colour key is a 16-bit value; Pillow has no equality mask for 16-bit modes.
            raise ImageProblem("is 16-bit greyscale with a transparent colour key, which has no faithful "
                               "8-bit rendering here")
        # Pillow's convert("L") clips 16-bit values at 255 (saturated white); keep the top
        # 8 bits instead. v / 256 is exact in binary and mode I's point() truncates, so
        # every pixel becomes exactly v >> 8.
        return im.convert("I").point(lambda v: v / 256).convert("L").convert("RGB")
    if mode not in CONVERTIBLE:
        raise ImageProblem(f"has pixel mode {mode} (e.g. 32-bit integer or float samples), which has no "
                           "defined 8-bit RGB rendering")
    if im.has_transparency_data:
        # Dropping alpha would show whatever colour hides under transparent pixels.
        fill = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(fill, im.convert("RGBA")).convert("RGB")
    return im if mode == "RGB" else im.convert("RGB")


def problem(images_root: Path, name: str, background: tuple[int, int, int] = CHECK_BACKGROUND,
            max_pixels: int | None = MAX_PIXELS) -> str | None:
    """Why training could not use image `name` of the dataset whose images are at `images_root`, or None."""
    try:
        load(resolve(images_root, name), background, max_pixels)
    except ImageProblem as e:
        return str(e)
    return None


def check_images(images_root: Path, names, processes: int | None = None, cache: Path | None = None,
                 progress: bool = True, max_pixels: int | None = MAX_PIXELS) -> dict[str, str]:
    """{name: reason} for every name in `names` that `problem` refuses; the rest pass.

    Each distinct name is resolved once here (cheap: stat calls), and each distinct file
    decoded once, by `load` in `processes` worker processes (default: the CPUs this
    process may use; 1: in this process). Processes, not threads: decoding is Python and
    C code that holds the GIL much of the time. A tqdm bar on stderr shows images/s.

    `cache`: a JSON file of verdicts by file fingerprint (resolved path, size, mtime_ns),
    valid only under the same settings (FORMAT_VERSION, Pillow's version and limits,
    max_pixels); a file whose fingerprint matches is not decoded again. Names that do
    not resolve are never cached (a missing file may appear). Written atomically, also
    when interrupted, with what was decided so far.

    RuntimeError if a worker process dies (a decoder crashed, or it was killed for memory).
    """
    if processes is not None and processes < 1:
        raise ValueError(f"processes should be at least 1 (or None: every CPU), got {processes}")
    root = os.path.realpath(images_root)
    verdicts: dict[str, str] = {}
    where: dict[str, str] = {}                    # name -> resolved path
    prints: dict[str, tuple[int, int]] = {}       # resolved path -> (size, mtime_ns)
    for name in dict.fromkeys(names):
        try:
            path, st = _locate(root, name)
        except ImageProblem as e:
            verdicts[name] = str(e)
            continue
        where[name] = str(path)
        prints[str(path)] = (st.st_size, st.st_mtime_ns)

    settings = _settings(max_pixels)
    known = _read_cache(cache, settings) if cache is not None else {}
    decided: dict[str, str | None] = {}           # resolved path -> verdict
    for path, fingerprint in prints.items():
        entry = known.get(path)
        if _matches(entry, fingerprint):
            decided[path] = entry[2]
    todo = [p for p in prints if p not in decided]
    try:
        for path, verdict in _decode_all(todo, processes, progress, max_pixels, cached=len(decided)):
            decided[path] = verdict
    finally:
        if cache is not None:
            known.update({p: [*prints[p], v] for p, v in decided.items()})
            _write_cache(cache, settings, known)
    verdicts.update({name: decided[path] for name, path in where.items() if decided[path] is not None})
    return verdicts


def _settings(max_pixels: int | None) -> dict:
    """What, besides a file's bytes, decides its verdict."""
    return {"format_version": FORMAT_VERSION, "pillow": PIL.__version__, "formats": list(FORMATS),
            "max_pixels": max_pixels, "pillow_max_image_pixels": Image.MAX_IMAGE_PIXELS,
            "load_truncated_images": bool(ImageFile.LOAD_TRUNCATED_IMAGES)}


def _matches(entry, fingerprint: tuple[int, int]) -> bool:
    """Whether a cache entry, as read from JSON (so of any shape), is a verdict for this fingerprint."""
    return (isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == fingerprint
            and (entry[2] is None or isinstance(entry[2], str)))


def _read_cache(cache: Path, settings: dict) -> dict[str, list]:
    """{resolved path: [size, mtime_ns, verdict]} from `cache`; empty if absent, unreadable or other settings'."""
    try:
        data = json.loads(Path(cache).read_text(encoding="utf-8"))
        if data["settings"] == settings and isinstance(data["verdicts"], dict):
            return data["verdicts"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a cache is only ever a shortcut: if it cannot be used, everything is decoded again
    return {}


def _write_cache(cache: Path, settings: dict, verdicts: dict[str, list]) -> None:
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "verdicts": verdicts}, f)
        os.replace(tmp, cache)  # readers see the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise


def _decode_chunk(paths: list[str], max_pixels: int | None) -> list[tuple[str, str | None]]:
    """One task: (path, verdict) for each path, by the same `load` training calls."""
    out = []
    for path in paths:
        try:
            load(Path(path), CHECK_BACKGROUND, max_pixels)
            out.append((path, None))
        except ImageProblem as e:
            out.append((path, str(e)))
    return out


def _decode_all(paths: list[str], processes: int | None, progress: bool, max_pixels: int | None, cached: int):
    """Yield (path, verdict) for every path, in any order, updating a progress bar."""
    from tqdm import tqdm

    if not paths:
        return
    workers = processes or _cpus()
    per_task = max(1, min(CHUNK, math.ceil(len(paths) / (workers * TASKS_PER_PROCESS))))
    chunks = [paths[i:i + per_task] for i in range(0, len(paths), per_task)]
    workers = min(workers, len(chunks))
    desc = f"checking images ({cached} cached)" if cached else "checking images"
    if workers <= 1 or len(paths) < PARALLEL_FROM:
        with tqdm(total=len(paths), desc=desc, unit="image", file=sys.stderr, **_bar(progress)) as bar:
            for chunk in chunks:
                results = _decode_chunk(chunk, max_pixels)
                yield from results
                bar.update(len(results))
        return
    # fork where there is one: workers start in milliseconds and need nothing re-imported
    # (spawn and forkserver re-import the caller's __main__ in each, with all it imports).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        pending = {pool.submit(_decode_chunk, chunk, max_pixels) for chunk in chunks}
        with tqdm(total=len(paths), desc=desc, unit="image", file=sys.stderr, **_bar(progress)) as bar:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        results = future.result()
                    except BrokenProcessPool as e:
                        raise RuntimeError("a process checking images died (a decoder crashed, or it was "
                                           "killed for memory); which image did is not known") from e
                    yield from results
                    bar.update(len(results))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, queued chunks are dropped, not decoded


def _bar(progress: bool) -> dict:
    """A bar on a terminal only (disable=None), gone when done: what stays on stderr is an `error:` line."""
    return {"disable": None if progress else True, "leave": False}


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (a Slurm job's share), not the node's
    except AttributeError:
        return os.cpu_count() or 1
