"""What a trial will cost, before it runs: training FLOPs over a device's sustained FLOP/s, in GPU-hours per node.

    forecaster = make_forecaster(configs, data, device=None, mfu=None)   # calibrates on this machine if needed
    forecaster.gpu_hours(cfg)        # per node, the paper's convention (Lu et al. 2023, Table 4)

FLOPs (the Kaplan/Chinchilla count: 2 per parameter and token forward, 2 more backward for
the activations' gradients, 2 more for the weights'), per sample, from the models' configs
alone (instantiated on torch's meta device: no weights are read, a Hugging Face id needs
only its config.json) and the stage table of the trial's method (trainables.methods):
- the vision tower runs forward over its patches (+ [CLS]); backward only when the stage
  adapts it (MMA), and the weights' gradients only when it trains in full;
- the projector over the image tokens; the LLM over the text and image tokens, attention
  included (4 x layers x sequence^2 x width per forward);
- backward through every part after the first one that trains, and weight gradients for the
  parts trained in full (LoRA's and the adapters' own weights are left out: they are under
  1% of the LLM's). So full fine-tuning is 6 N T, LoRA/QLoRA 4 N T (QLoRA's dequantization is
  not counted: it is memory traffic, which a measured rate absorbs), stage 1 also 4 N T.
Tokens per sample are the data's (the dataset check measured every record), images per
sample its share of records with an image.

The rate: a device's peak dense bf16 FLOP/s (vendor datasheets, `PEAK_FLOPS`) times the
model-FLOPs utilisation `MFU` the study file gives (e.g. 0.35 for a cluster), or, without
them, a rate measured here by a short calibration run of the trial's own training step
(`calibrate`: real model, real DeepSpeed, synthetic batches of the data's shape), cached
per machine and model in $MMSCALE_CACHE/calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Dense bf16 (tensor core) peak FLOP/s per device, without sparsity, from the vendors' datasheets.
PEAK_FLOPS = {
    "A100": 312e12,     # NVIDIA A100 SXM/PCIe
    "H100": 989e12,     # NVIDIA H100 SXM (PCIe: 756e12)
    "H100-PCIE": 756e12,
    "H200": 989e12,     # NVIDIA H200 SXM
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "MI300X": 1307e12,  # AMD Instinct MI300X
}
CALIBRATION_STEPS, WARMUP_STEPS = 4, 2
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class Shapes:
    """What the FLOP count needs of a trial's models (parameter counts of the matrix multiplies)."""
    llm: int            # LLM linear weights, LM head included (embedding lookups cost no FLOPs)
    llm_layers: int
    llm_width: int
    vision: int         # vision tower linear weights and patch embedding
    vision_layers: int
    vision_width: int
    patches: int        # vision positions per image ([CLS] included)
    projector: int
    image_tokens: int   # LLM positions per image


@dataclass(frozen=True)
class DataShape:
    """Per-sample averages of a split: text tokens (one <image> token included) and the share with an image."""
    tokens: float
    image_share: float


def _linear_params(module) -> int:
    import torch

    total = 0
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            total += m.weight.numel()
    return total


def shapes_of(cfg) -> Shapes:
    """The trial's model shapes from configs only (meta device: no weights read, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from trainables.methods import METHODS
    from trainables.model import llm_id, trust_remote_code, vision_id

    text = AutoConfig.from_pretrained(llm_id(cfg.model_size), trust_remote_code=trust_remote_code())
    vision = CLIPVisionConfig.from_pretrained(vision_id(cfg))
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text)
        tower = CLIPVisionModel(vision)
    side = vision.image_size // vision.patch_size
    method = METHODS[cfg.method]
    if method.image_tokens:
        from trainables.methods.mma.config import MMAConfig

        image_tokens = 1 + len(MMAConfig.from_trial(cfg).neck_layers(vision.num_hidden_layers))
    else:
        image_tokens = side * side
    return Shapes(llm=_linear_params(llm), llm_layers=text.num_hidden_layers, llm_width=text.hidden_size,
                  vision=_linear_params(tower), vision_layers=vision.num_hidden_layers,
                  vision_width=vision.hidden_size, patches=side * side + 1,
                  projector=vision.hidden_size * text.hidden_size + text.hidden_size * text.hidden_size,
                  image_tokens=image_tokens)


def flops_per_sample(shapes: Shapes, data: DataShape, table: dict[str, str], max_length: int) -> float:
    """Training FLOPs of one sample through the stage whose table is `table` (part -> frozen/lora/adapter/full)."""
    from trainables.methods.stages import FROZEN, FULL

    images = data.image_share
    tokens = min(max_length, data.tokens - images + images * shapes.image_tokens)
    order = ["vision_tower", "projector", "llm"]
    trains = [part for part in order if table.get(part, FROZEN) != FROZEN]
    first = order.index(trains[0]) if trains else len(order)
    # forward FLOPs per part (2 per weight and position), attention included
    forward = {
        "vision_tower": images * (2 * shapes.vision * shapes.patches
                                  + 4 * shapes.vision_layers * shapes.patches ** 2 * shapes.vision_width),
        "projector": images * 2 * shapes.projector * shapes.image_tokens,
        "llm": 2 * shapes.llm * tokens + 4 * shapes.llm_layers * tokens ** 2 * shapes.llm_width,
    }
    total = 0.0
    for i, part in enumerate(order):
        total += forward[part]
        if i >= first:
            total += forward[part]  # the activations' gradients
            if table.get(part) == FULL:
                total += forward[part]  # the weights' gradients
    return total


@dataclass
class Forecaster:
    """GPU-hours per node of a trial before it runs. Picklable: the study's driver and its searcher use it."""
    data: dict[str, DataShape]                       # split -> per-sample shape ("train", "captions")
    rates: dict[str, float] = field(default_factory=dict)  # rate key -> sustained FLOP/s per device
    shapes: dict[str, Shapes] = field(default_factory=dict)
    device: str = "cpu"                              # a PEAK_FLOPS key, or "cpu" (measured here)
    mfu: float | None = None
    measured: dict[str, float] = field(default_factory=dict)  # rate key -> MFU where a peak is known

    def rate(self, cfg) -> float:
        """Sustained FLOP/s per device: the peak x MFU, or the rate measured for this kind of trial (the same
        models and method measured at another batch or length, when this one was not: the space's searched
        batch sizes are not each calibrated)."""
        if self.device in PEAK_FLOPS and self.mfu is not None:
            return PEAK_FLOPS[self.device] * self.mfu
        key = rate_key(cfg)
        if key in self.rates:
            return self.rates[key]
        same = [r for k, r in self.rates.items() if json.loads(k)[:4] == json.loads(key)[:4]]
        return (same or list(self.rates.values()))[0]

    def flops(self, cfg) -> dict[str, float]:
        """Training FLOPs of the trial per stage (all workers together)."""
        from trainables.methods import METHODS, STAGE1

        shapes = self.shapes[shape_key(cfg)]
        method = METHODS[cfg.method]
        out = {"stage2": cfg.stage2_steps * cfg.batch_size * flops_per_sample(
            shapes, self.data["train"], method.stage2, cfg.max_length)}
        s1 = cfg.stage1_steps if method.two_stage and "captions" in self.data else 0
        out["stage1"] = s1 * cfg.batch_size * flops_per_sample(shapes, self.data.get("captions", self.data["train"]),
                                                               STAGE1, cfg.max_length)
        return out

    def gpu_hours(self, cfg) -> float:
        """Device-hours / devices per node: total FLOPs / (sustained FLOP/s per device x 3600 x devices per node)."""
        if shape_key(cfg) not in self.shapes:  # a kind of trial the space enumeration did not meet
            self.shapes[shape_key(cfg)] = shapes_of(cfg)
        return sum(self.flops(cfg).values()) / (self.rate(cfg) * 3600 * cfg.devices_per_node)

    def dollars(self, cfg) -> float:
        return self.gpu_hours(cfg) * cfg.price_per_node_hour

    def gpu_hours_of(self, config: dict) -> float:
        """The forecast of a Tune trial's config (Optuna's names + constants)."""
        from trainables.config import trial_config

        return self.gpu_hours(trial_config(config))


def shape_key(cfg) -> str:
    return json.dumps([cfg.model_size, cfg.vision_tower, cfg.image_size, cfg.method, cfg.neck_every])


def rate_key(cfg) -> str:
    """What a measured rate depends on: the models, the method, the batch and the device's threads."""
    return json.dumps([cfg.model_size, cfg.vision_tower, cfg.image_size, cfg.method, cfg.batch_size // cfg.num_workers,
                       cfg.max_length, cfg.use_gpu])


def data_shapes(data) -> dict[str, DataShape]:
    """Per-sample averages of the splits training reads, from the dataset check's counts."""
    out = {}
    for name in ("train", "captions"):
        splits = [s[name] for s in data.splits.values() if name in s]
        if splits and splits[0].rows:
            s = splits[0]
            out[name] = DataShape(tokens=s.tokens / s.rows, image_share=s.image_rows / s.rows)
    return out


def make_forecaster(configs, data, device: str | None = None, mfu: float | None = None, threads: int = 1,
                    say=print) -> Forecaster:
    """A Forecaster for every configuration class in `configs` (study.space.encoding_configs), calibrating the
    rate on this machine for each when no device and MFU are given."""
    forecaster = Forecaster(data=data_shapes(data), device=device or ("gpu-here" if configs[0].use_gpu else "cpu"),
                            mfu=mfu)
    for cfg in configs:
        forecaster.shapes.setdefault(shape_key(cfg), shapes_of(cfg))
    if device in PEAK_FLOPS and mfu is not None:
        return forecaster
    for cfg in configs:
        key = rate_key(cfg)
        if key not in forecaster.rates:
            forecaster.rates[key] = calibrate(cfg, forecaster.data["train"], threads, say)
    return forecaster


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{gpu}|torch {torch.__version__}"


def calibration_cache(cfg, data: DataShape, threads: int) -> Path:
    from zoo import cache_dir

    key = json.dumps({"v": CALIBRATION_VERSION, "machine": _machine(), "rate": rate_key(cfg), "threads": threads,
                      "tokens": round(data.tokens), "images": round(data.image_share, 2), "rank": cfg.lora_rank})
    return cache_dir() / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def calibrate(cfg, data: DataShape, threads: int = 1, say=print) -> float:
    """Sustained training FLOP/s of one worker for `cfg` on this machine, measured once and cached: the trial's
    stage-2 model (stage table, DeepSpeed, `threads` CPU threads or one GPU) trained on synthetic batches of
    the data's shape, WARMUP_STEPS untimed then CALIBRATION_STEPS timed, in a fresh process."""
    cache = calibration_cache(cfg, data, threads)
    if cache.is_file():
        return json.loads(cache.read_text())["flops_per_s"]
    say(f"  forecast: calibrating the training rate of {cfg.method} {cfg.model_size} on this machine (once)")
    job = json.dumps({"cfg": cfg.to_dict(), "tokens": data.tokens, "image_share": data.image_share,
                      "threads": threads})
    r = subprocess.run([sys.executable, "-m", "study.forecast", job], capture_output=True, text=True, timeout=1800)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"calibration of {cfg.method} {cfg.model_size} failed:\n{r.stderr[-3000:]}")
    found = json.loads(lines[-1][len("RESULT "):])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found["flops_per_s"]


def _calibrate_here(job: dict) -> dict:
    """The calibration run itself (in its own process: it opens a one-rank process group)."""
    import tempfile
    import time

    import torch
    import torch.distributed as dist

    from trainables import worker
    from trainables.config import TrialConfig
    from trainables.data.check import DataPlan
    from trainables.methods import METHODS, apply_stage
    from trainables.model import build_llava, build_processor, image_tokens

    # the rate does not depend on the learning rates, but a study's first configuration may diverge (lr 1e30 in
    # tests/test_failures.py): calibrate with the defaults so a diverging trial fails alone, not the forecast
    defaults = TrialConfig()
    cfg = TrialConfig.from_dict(job["cfg"]).replace(
        num_workers=1, batch_size=max(1, job["cfg"]["batch_size"] // job["cfg"]["num_workers"]),
        lr=defaults.lr, projector_lr=defaults.projector_lr)
    torch.set_num_threads(job["threads"])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = torch.device("cuda", 0) if cfg.use_gpu else torch.device("cpu")
    processor = build_processor(cfg)
    n_image = image_tokens(cfg, processor)
    with tempfile.TemporaryDirectory() as tmp:
        # a one-rank group through a file (trainables.rendezvous): no TCP store listening on every interface
        dist.init_process_group("nccl" if cfg.use_gpu else "gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1),
                                rank=0, world_size=1)
        base = Path(tmp) / "base"
        build_llava(cfg, processor).save_pretrained(base)
        method = METHODS[cfg.method]
        model, _ = apply_stage(method.load(base, cfg), method.stage2, cfg, method.wrap)
        ctx = worker.Ctx(cfg, 0, 1, device, processor, DataPlan(tmp), Path(tmp), None, "calibration", n_image)
        batch = synthetic_batch(cfg, processor, n_image, job["tokens"], job["image_share"])
        steps = WARMUP_STEPS + CALIBRATION_STEPS
        dataset = [batch_item for batch_item in batch] * math.ceil(steps * cfg.batch_size / len(batch))
        seconds = {}

        def timer(engine, step, elapsed):
            seconds[step] = time.perf_counter()
            return None

        cfg_steps = cfg.replace(stage2_steps=steps)
        ctx.cfg = cfg_steps
        worker.train(ctx, model, worker.param_groups(model, cfg_steps), dataset, steps, "calibration",
                     interim=timer)
        dist.destroy_process_group()
    per_step = (seconds[steps] - seconds[WARMUP_STEPS]) / CALIBRATION_STEPS
    shapes = shapes_of(cfg)
    flops = cfg.batch_size * flops_per_sample(shapes, DataShape(job["tokens"], job["image_share"]),
                                              METHODS[cfg.method].stage2, cfg.max_length)
    return {"flops_per_s": flops / per_step, "seconds_per_step": per_step, "flops_per_step": flops}


def synthetic_batch(cfg, processor, n_image: int, tokens: float, image_share: float) -> list[dict]:
    """Items of the data's shape (mean length, share with an image): what the calibration trains on."""
    import torch

    size = processor.image_processor.crop_size["height"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    length = max(4, min(cfg.max_length - n_image + 1, round(tokens)))
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(cfg.batch_size):
        ids = torch.randint(10, len(processor.tokenizer) - 1, (length,), generator=generator)
        item = {"input_ids": ids, "labels": ids.clone(), "index": i}
        if i < round(image_share * cfg.batch_size):
            ids[1] = image_id
            item["labels"][1] = -100
            item["pixel_values"] = torch.randn(3, size, size, generator=generator)
        items.append(item)
    return items


if __name__ == "__main__":
    print("RESULT " + json.dumps(_calibrate_here(json.loads(sys.argv[1]))), flush=True)
