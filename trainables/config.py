"""TrialConfig: the one schema of a trial.

The search space's keys, Optuna's parameter names, the MLflow params and the
analysis columns are these field names (STYLE.md, "one name per idea"). A config
is built from a flat dict; unknown keys and out-of-range values raise
`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

PAPER_PRICE_PER_NODE_HOUR = 13.63  # the scaling paper's cost convention ($ per 8-GPU node-hour)
MAX_SEED = 2**32 - 1  # the largest seed every library a trial seeds takes
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's, for a trial's workers


class ConfigError(ValueError):
    """A trial setting that is unknown or out of range; the message names the key."""


def _doc(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TrialConfig:
    # --- what is studied ---
    method: str = _doc("tuning method of stage 2 (see trainables.methods.METHODS)", default="lora")
    model_size: str = _doc("the LLM: a zoo size (0.3m, 1m, 3.6m) or a Hugging Face id / local path "
                           "(e.g. lmsys/vicuna-7b-v1.5 on a cluster)", default="1m")
    vision_tower: str = _doc("the vision tower: empty = the zoo's at image_size, a shaped tower (zoo.shapes), or a "
                             "Hugging Face id / path (e.g. openai/clip-vit-large-patch14-336)", default="")
    image_size: int = _doc("input resolution of the vision tower in pixels (the zoo's towers: 32 or 48; a shaped "
                           "tower's own; CLIP-L/14: 224 or 336)", default=32)
    image_aspect: str = _doc("non-square images: 'pad' to square with the mean colour (LLaVA's default) "
                             "or 'resize'", default="pad")
    lora_rank: int = _doc("LoRA rank r", default=16)
    lora_alpha: float = _doc("LoRA alpha (scaling = alpha / rank); the paper found 2 x rank best", default=32.0)
    lora_dropout: float = _doc("dropout on the LoRA branch", default=0.05)
    lr: float = _doc("stage-2 peak learning rate of the tuned LLM weights (adapters, or all for full)",
                     default=1e-3)
    projector_lr: float = _doc("stage-2 learning rate of the projector (LLaVA trains it beside LoRA)",
                               default=5e-4)
    adapter_dim: int = _doc("MMA: bottleneck width of each MM-Adapter (LaVIN: 8)", default=8)
    router_temperature: float = _doc("MMA: softmax temperature of the adapters' modality routers (LaVIN: 10)",
                                     default=10.0)
    neck_dim: int = _doc("MMA: hidden width of the visual neck's MLP (LaVIN: 128)", default=128)
    neck_every: int = _doc("MMA: the visual neck takes the [CLS] token of every n-th vision layer (LaVIN: 4)",
                           default=4)
    mix_ratio: float = _doc("fraction of language-only samples in stage 2 (the paper's data-mixing axis)",
                            default=0.0)
    # --- the recipe ---
    stage1_steps: int = _doc("stage-1 optimizer steps (projector only, on captions)", default=150)
    stage1_lr: float = _doc("stage-1 learning rate of the projector", default=2e-3)
    stage2_steps: int = _doc("stage-2 optimizer steps (visual instruction tuning)", default=300)
    batch_size: int = _doc("global batch size (split over workers)", default=32)
    warmup_ratio: float = _doc("fraction of steps with linear warm-up", default=0.05)
    weight_decay: float = _doc("AdamW weight decay", default=0.0)
    max_length: int = _doc("token budget per sample, image tokens included", default=128)
    eval_samples: int = _doc("held-out samples evaluated (0 = all)", default=400)
    max_new_tokens: int = _doc("greedy-decoding budget per answer", default=8)
    eval_batch_size: int = _doc("prompts per generate() call in evaluation (answers are the same at any size)",
                                default=32)
    interim_every: int = _doc("stage-2 steps between interim evaluations on a small fixed eval subset, reported to "
                              "Ray Tune as `interim_score` (what an early-stopping scheduler such as ASHA judges "
                              "trials by; 0 = none)", default=0)
    interim_samples: int = _doc("held-out samples of each interim evaluation (the first ones of the eval split)",
                                default=32)
    seed: int = _doc("seed of data order, LoRA init and dropout (0 to 2**32 - 1)", default=0)
    # --- where and how it runs ---
    num_workers: int = _doc("Ray Train workers (data-parallel ranks) per trial", default=1)
    use_gpu: bool = _doc("one GPU per worker (bf16) instead of the CPU (fp32)", default=False)
    zero_stage: int = _doc("DeepSpeed ZeRO stage: 2 (default) or 3", default=2)
    checkpoint_every: int = _doc("stage-2 steps between checkpoints a restarted worker group resumes from "
                                 "(trained weights, optimizer, scheduler, RNG, data position; 0 = never)",
                                 default=50)
    max_worker_failures: int = _doc("times Ray Train restarts a trial's worker group after a worker dies, "
                                    "each from the last checkpoint, before the trial fails (0 = never; an "
                                    "error of the trial itself, e.g. a diverging loss, is not trained again)",
                                    default=2)
    loader_workers: int = _doc("DataLoader processes per worker that read, decode and preprocess batches "
                               "beside training (0 = in the training process)", default=1)
    placement_strategy: str = _doc("where a trial's workers go on a cluster (Ray's placement strategies: PACK "
                                   "onto few nodes, SPREAD, STRICT_PACK one node, STRICT_SPREAD one per node)",
                                   default="PACK")
    devices_per_node: int = _doc("devices per node for GPU-hours per node (the paper: 8 A100s)", default=8)
    price_per_node_hour: float = _doc("dollars per node-hour (the paper, Table 4: $13.63 per 8-A100 node-hour)",
                                      default=PAPER_PRICE_PER_NODE_HOUR)

    def __post_init__(self):
        from zoo import IMAGE_SIZES, LLM_SIZES
        from zoo.shapes import SHAPED_LLMS, SHAPED_TOWERS
        from trainables.methods import METHODS

        checks = {
            "method": self.method in METHODS,
            "model_size": self.model_size in LLM_SIZES or self.model_size in SHAPED_LLMS or "/" in self.model_size,
            "vision_tower": (not self.vision_tower or "/" in self.vision_tower or self.vision_tower in SHAPED_TOWERS),
            "image_size": self.image_size >= 8 and (
                (not self.vision_tower and self.image_size in IMAGE_SIZES) or "/" in self.vision_tower
                or (self.vision_tower in SHAPED_TOWERS
                    and self.image_size == SHAPED_TOWERS[self.vision_tower]["image_size"])),
            "image_aspect": self.image_aspect in ("pad", "resize"),
            "lora_rank": self.lora_rank > 0,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            "lr": self.lr > 0,
            "projector_lr": self.projector_lr > 0,
            "adapter_dim": self.adapter_dim > 0,
            "router_temperature": self.router_temperature > 0,
            "neck_dim": self.neck_dim > 0,
            "neck_every": self.neck_every > 0,
            "mix_ratio": 0 <= self.mix_ratio < 1,
            "stage1_steps": self.stage1_steps >= 0,
            "stage1_lr": self.stage1_lr > 0,
            "stage2_steps": self.stage2_steps > 0,
            "batch_size": self.batch_size > 0 and self.batch_size % max(self.num_workers, 1) == 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0,
            "max_length": self.max_length > 0,
            "eval_samples": self.eval_samples >= 0,
            "max_new_tokens": self.max_new_tokens > 0,
            "eval_batch_size": self.eval_batch_size > 0,
            "interim_every": self.interim_every >= 0,
            "interim_samples": self.interim_samples > 0,
            "loader_workers": self.loader_workers >= 0,
            "placement_strategy": self.placement_strategy in PLACEMENT_STRATEGIES,
            "num_workers": self.num_workers > 0,
            "zero_stage": self.zero_stage in (2, 3),
            "checkpoint_every": self.checkpoint_every >= 0,
            "max_worker_failures": self.max_worker_failures >= 0,
            # numpy's generators (the batch order) take no negative seed; torch none of 2**64 or more, and
            # numpy's legacy seeding and most tools (transformers' set_seed, lmms-eval) none of 2**32 or more
            "seed": 0 <= self.seed <= MAX_SEED,
            "devices_per_node": self.devices_per_node > 0,
            "price_per_node_hour": self.price_per_node_hour >= 0,
        }
        for f in fields(self):  # inf or nan passes every comparison above that it should fail
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value!r} is not a finite number ({self.help(f.name)})")
        for key, ok in checks.items():
            if not ok:
                hint = {"method": f"one of {sorted(METHODS)}",
                        "model_size": f"a zoo size {sorted(LLM_SIZES)}, a shaped model {sorted(SHAPED_LLMS)}, or a "
                                      "Hugging Face id / path",
                        "vision_tower": f"empty (the zoo's tower at image_size), a shaped tower "
                                        f"{sorted(SHAPED_TOWERS)}, or a Hugging Face id / path"}.get(key, self.help(key))
                raise ConfigError(f"{key}={getattr(self, key)!r} is out of range ({hint})")
        problem = METHODS[self.method].problem(self)
        if problem:
            raise ConfigError(problem)

    @staticmethod
    def help(key: str) -> str:
        return {f.name: f.metadata["help"] for f in fields(TrialConfig)}[key]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown trial key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        coerced = {key: _coerce(key, value, type(known[key].default)) for key, value in values.items()}
        return cls(**coerced)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrialConfig":
        """A trial's config back from its MLflow params (strings); params outside the schema are ignored."""
        known = cls.__dataclass_fields__
        return cls.from_dict({k: parse_param(k, v) for k, v in params.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def logged_params(self) -> dict[str, Any]:
        """The params MLflow logs for this trial: the fields every trial shares, its method's own (no
        `lora_rank` on a full run: the registry says which are whose), `alpha_per_rank` beside
        `lora_alpha`, and stage 1's only where the trial has a stage 1 (`stage1_steps` 0 otherwise)."""
        from trainables.methods import METHODS, method_fields

        method = METHODS[self.method]
        others = method_fields() - set(method.fields)
        values = {k: v for k, v in self.to_dict().items() if k not in others}
        if "lora_alpha" in values and "lora_rank" in values:
            values["alpha_per_rank"] = self.lora_alpha / self.lora_rank
        if not method.two_stage or self.stage1_steps == 0:
            values["stage1_steps"] = 0
            values.pop("stage1_lr", None)
        return values

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})


# Params logged beside the fields, derived from them (TrialConfig.logged_params), with their types.
DERIVED = {"alpha_per_rank": float}


def parse_param(key: str, value: str) -> Any:
    """A logged param back in its TrialConfig type; keys outside the schema, or unparsable values, stay strings."""
    field = TrialConfig.__dataclass_fields__.get(key)
    if field is None and key not in DERIVED:
        return value
    kind = DERIVED.get(key) or type(field.default)
    if kind is bool:
        return value == "True"
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        return value


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept what a search space or YAML/JSON would give (1 for 1.0, 1e-3 for 0.001); refuse the rest."""
    ok = True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key}={value!r} should be of type {kind.__name__}")
    return kind(value)


def trial_config(tune_config: dict) -> TrialConfig:
    """A Tune trial's config (Optuna's names + constants) -> TrialConfig.

    The one derived key: `alpha_per_rank` (study.space.alpha_per_rank, the paper's "alpha = 2 x rank")
    becomes `lora_alpha` = lora_rank x alpha_per_rank.
    """
    values = dict(tune_config)
    if "alpha_per_rank" in values:
        values["lora_alpha"] = values["lora_rank"] * values.pop("alpha_per_rank")
    return TrialConfig.from_dict(values)
