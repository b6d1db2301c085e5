"""A study's data made ready for its trials: the dataset check run for the tokenizers and towers the trials use.

    report, plan = prepare(root, configs, storage)     # the study, before Ray starts
    python -m trainables.data DIR [--stage1-data DIR]  # the same check alone, with the zoo's defaults

`configs` are trial configs the study can produce (study.space enumerates them): each
tokenizer among them is one encoding, checked for the worst case of its trials (the most
image tokens per image, the smallest max_length), so a record the check passes fits every
trial that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from trainables.config import TrialConfig
from trainables.data.check import DataPlan, Encoding, check
from trainables.data.records import Report


def encodings(configs: Iterable[TrialConfig]) -> list[Encoding]:
    """One Encoding per distinct tokenizer (vocabulary + chat template) among `configs`."""
    from trainables.data.shards import tokenizer_key
    from trainables.model import build_processor, image_tokens

    processors: dict[tuple, object] = {}
    found: dict[str, dict] = {}
    for cfg in configs:
        at = (cfg.model_size, cfg.vision_tower, cfg.image_size)
        if at not in processors:
            processors[at] = build_processor(cfg)
        processor = processors[at]
        key = tokenizer_key(processor.tokenizer)
        entry = found.setdefault(key, {"tokenizer": processor.tokenizer, "image_tokens": 0,
                                       "max_length": cfg.max_length, "sizes": []})
        entry["image_tokens"] = max(entry["image_tokens"], image_tokens(cfg, processor))
        entry["max_length"] = min(entry["max_length"], cfg.max_length)
        if cfg.model_size not in entry["sizes"]:
            entry["sizes"].append(cfg.model_size)
    return [Encoding(e["tokenizer"], e["image_tokens"], e["max_length"], f"model_size {'/'.join(e['sizes'])}")
            for e in found.values()]


def prepare(root: Path, configs: Iterable[TrialConfig], storage: Path | None, *, stage1: Path | None = None,
            write: bool = True, skip_invalid: bool = False, seed: int = 0, processes: int | None = None,
            progress: bool = True) -> tuple[Report, DataPlan | None]:
    """The check of `root` for these trials; with `write`, the shards they read under `storage`."""
    return check(root, encodings(configs), stage1=stage1, storage=storage, write=write and storage is not None,
                 skip_invalid=skip_invalid, seed=seed, processes=processes, progress=progress)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m trainables.data",
                                description="check a LLaVA-format dataset as a study would, with the zoo's "
                                            "tokenizer and towers; every problem, one line each")
    p.add_argument("root", help="the dataset directory")
    p.add_argument("--stage1-data", help="a dataset directory of caption pairs for stage 1")
    p.add_argument("--max-length", type=int, default=TrialConfig.max_length)
    p.add_argument("--image-size", type=int, default=TrialConfig.image_size)
    args = p.parse_args(argv)
    cfg = TrialConfig(max_length=args.max_length, image_size=args.image_size)
    report, _ = prepare(Path(args.root), [cfg], None, stage1=Path(args.stage1_data) if args.stage1_data else None,
                        write=False, skip_invalid=True)
    for problem in report.problems:
        print(f"{problem.where(report.root)}: {problem.message}")
    for note in report.notes:
        print(f"note: {note}")
    total, bad = sum(report.counts.values()), len(report.skipped())
    n = len(report.problems)
    print(f"{total} records in {', '.join(report.counts) or 'no readable file'}: "
          f"{n} problem{'s' if n != 1 else ''} in {bad} record{'s' if bad != 1 else ''}")
    return 0 if report.ok else 2
