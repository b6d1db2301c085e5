"""Stages as data: which part of the model is frozen, adapted or fully trained, per stage and method.

A method is a small table plus a few functions (STYLE.md, "stages are data"):
`apply_stage` makes a model match a table, asserts that it does, and returns the
trainable-parameter count per part, which the worker logs. Nothing else touches
`requires_grad`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the registry is read by analysis/, which must not need torch to label a trial
    import torch

FROZEN, LORA, ADAPTER, FULL = "frozen", "lora", "adapter", "full"
QUANT_STORAGE_BNB = "0.43.0"  # the first bitsandbytes with bnb_4bit_quant_storage (4-bit weights ZeRO-3 can shard);
# pyproject asks for more, but a cluster image may bring its own (installed with --no-deps)
# projector = LLaVA's 2-layer MLP; neck = MMA's visual neck and modality tokens (LaVIN), which replace it.
PARTS = ("vision_tower", "projector", "neck", "llm")
# LLaVA's stage 1 (feature alignment): only the projector learns, on captions.
STAGE1 = {"vision_tower": FROZEN, "projector": FULL, "llm": FROZEN}
# Which parameter names an adapted part may train (anything else in it stays frozen).
ADAPTER_MARKS = {LORA: "lora_", ADAPTER: "mma_"}


def installed(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _no_wrap(model, cfg):
    return model


@dataclass(frozen=True)
class Method:
    """One tuning method: everything the rest of the project may know about it (STYLE.md: the registry
    is the only place that knows a method). Adding a method is one module in this package that
    defines `METHOD` (found by `trainables.methods`), plus its space file.

    stage2                             the stage-2 table: part -> FROZEN / LORA / ADAPTER / FULL
    artifact                           the MLflow artifact folder it saves (adapter/, model/, mma/)
    load(base_dir, cfg) -> model       the stage-2 starting model (qlora: 4-bit base)
    wrap(model, cfg) -> model          adds adapters (PEFT LoRA, MM-Adapters); marks them trainable
    save(ctx, engine, out_dir)         writes the trial's artifact (a collective under ZeRO-3)
    export(artifact, cfg, out, base)   writes a Hugging Face LLaVA checkpoint of the trained model into `out`
    base_of(artifact) -> str | None    the checkpoint the artifact was trained on, as it records it (None:
                                       the artifact is a whole model)
    image_tokens(processor, cfg) -> n  placeholder tokens per image in the text (None: one per vision patch)
    fields                             TrialConfig fields it reads beyond the shared ones: logged only for it
    label_fields                       (field, format) pairs that tell its trials apart in a table or legend
    library, how_to_load               its artifact's model card: the library that loads it, and Python that
                                       does ({base}: the checkpoint it was trained on, {artifact}: its folder)
    """
    name: str
    stage2: dict[str, str]
    artifact: str
    load: Callable
    save: Callable
    export: Callable
    base_of: Callable = lambda artifact: None  # noqa: E731
    wrap: Callable = _no_wrap
    image_tokens: Callable | None = None
    two_stage: bool = True  # False: no stage-1 training (MMA is single-stage)
    quantize_base: bool = False  # QLoRA = LoRA + this (decided in methods.qlora.quantization_config)
    fields: tuple[str, ...] = ()
    label_fields: tuple[tuple[str, str], ...] = ()
    description: str = ""
    library: str = "transformers"
    how_to_load: str = ""

    def problem(self, cfg) -> str | None:
        """A setting this method cannot run with, as a one-line reason (None if fine)."""
        if self.quantize_base and cfg.zero_stage == 3:
            have = installed("bitsandbytes")
            from packaging.version import Version

            if have is None or Version(have) < Version(QUANT_STORAGE_BNB):
                return (f"zero_stage=3 with method={self.name} needs bitsandbytes >= {QUANT_STORAGE_BNB} (ZeRO-3 "
                        "shards 4-bit weights stored in the compute dtype, bnb_4bit_quant_storage); installed: "
                        f"{have or 'none'}. Upgrade bitsandbytes, or use zero_stage=2")
        return None

    def label(self, values) -> str:
        """How a trial of this method reads in a legend: "lora r16"; `values` is any mapping of its params."""
        parts = [self.name]
        for key, fmt in self.label_fields:
            value = values.get(key) if hasattr(values, "get") else None
            if value is not None and value == value:  # NaN: a run that did not log it
                parts.append(fmt.format(value))
        return " ".join(parts)


def load_base(base, cfg):
    """The saved LLaVA (stage-1 result, or the assembled model for single-stage methods) to tune."""
    from trainables.model import load_llava

    return load_llava(base, cfg)


def recorded_base(config_name: str, key: str = "base_model_name_or_path") -> Callable:
    """`base_of` for artifacts that name their base checkpoint in a JSON file (PEFT's adapter_config.json)."""
    def base_of(artifact: Path) -> str | None:
        path = Path(artifact) / config_name
        return json.loads(path.read_text()).get(key) if path.is_file() else None

    return base_of


def save_adapter(ctx, engine, out) -> None:
    """The model's own `save_pretrained` of its trained weights only (PEFT adapter, MMA weights), from
    rank 0; under ZeRO-3 only the trainable parameters are gathered, never the frozen base."""
    model = engine.module
    if ctx.cfg.zero_stage == 3:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if ctx.rank == 0:
                model.save_pretrained(out)
    elif ctx.rank == 0:
        model.save_pretrained(out)


def part_of(param_name: str) -> str:
    """Which part a parameter belongs to (names as transformers 5 / PEFT / our MMA write them)."""
    if "mma_neck." in param_name:
        return "neck"
    if "vision_tower." in param_name:
        return "vision_tower"
    if "multi_modal_projector." in param_name:
        return "projector"
    if "language_model." in param_name or "lm_head." in param_name:
        return "llm"
    raise ValueError(f"parameter {param_name!r} belongs to no known LLaVA part")


def apply_stage(model: torch.nn.Module, table: dict[str, str], cfg=None,
                wrap: Callable = _no_wrap) -> tuple[torch.nn.Module, dict[str, int]]:
    """Freeze everything, let `wrap` add adapters, train the FULL parts; return (model, counts per part)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model = wrap(model, cfg)
    for name, p in model.named_parameters():
        if table[part_of(name)] == FULL and "original_module" not in name:
            p.requires_grad_(True)
    return model, check_stage(model, table)


class StageError(RuntimeError):
    """A model that does not train what its stage table says (raised, not asserted: it holds under python -O)."""


def check_stage(model: torch.nn.Module, table: dict[str, str]) -> dict[str, int]:
    """Check the model trains exactly what `table` says (StageError if not); return trainable counts per part."""
    counts = {part: 0 for part in table}
    for name, p in model.named_parameters():
        part = part_of(name)
        if part not in table:
            raise StageError(f"{name}: the model has a {part} but this stage's table does not say what it does")
        mode = table[part]
        if p.requires_grad:
            counts[part] += p.numel()
            if not (mode == FULL or (mode in ADAPTER_MARKS and ADAPTER_MARKS[mode] in name)):
                raise StageError(f"{name} trains but {part} is {mode} in this stage")
        elif mode == FULL and "original_module" not in name:
            raise StageError(f"{name} is frozen but {part} is fully trained in this stage")
    for part, mode in table.items():
        if (counts[part] > 0) != (mode != FROZEN):
            raise StageError(f"{part} should be {mode}, trains {counts[part]} params")
    return counts


def dir_mb(path: Path) -> float:
    """Size of what a trial saved (the paper's point: adapters are MBs, full checkpoints GBs)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
