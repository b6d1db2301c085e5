"""Peak memory, trainable parameters and step time of each tuning method (BENCHMARKS.md).

    python -m bench.memory --model-size 3.6m                    # the zoo's largest LLM, CPU
    python -m bench.memory --shape 7b --gpu --methods full lora qlora   # a 7B-shaped LLaVA, random weights

Each method runs in its own process, because peak memory is per process: the stage-2
model exactly as a trial builds it (method.load -> wrap -> stage table), DeepSpeed
ZeRO-2 on one rank, `--steps` optimizer steps, then one JSON line with the peak
(GPU: max allocated; CPU: peak resident set size), the trainable parameters and the
seconds per step. `--shape` builds the LLaVA from a config (Vicuna-7B-shaped LLM,
CLIP-L/336-shaped tower, random weights, bf16 on GPU) instead of the zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench import ChildFailed, result_line, run_child

# hidden, layers, intermediate, heads (LLM); the tower is CLIP-L/14 at 336 px for "7b", smaller otherwise.
SHAPES = {
    "7b": dict(llm=(4096, 32, 11008, 32), vision=(1024, 24, 4096, 16, 14, 336), vocab=32000),
    "60m": dict(llm=(512, 8, 1376, 8), vision=(256, 4, 1024, 4, 14, 112), vocab=32000),  # CPU-sized check
    # a 1B-class Llama (Llama-3.2-1B's width, depth and MLP, Llama-2's vocabulary) with the CLIP-L/14-336 tower
    "1b": dict(llm=(2048, 16, 8192, 32), vision=(1024, 24, 4096, 16, 14, 336), vocab=32000),
    "tiny": dict(llm=(64, 2, 172, 4), vision=(32, 2, 128, 2, 14, 336), vocab=32000),  # bench.gpu --dry
}


def shaped_base(shape: str, processor, out: Path, dtype) -> Path:
    """A LLaVA checkpoint of the given shape with random weights, plus a processor at its resolution."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SHAPES[shape]
    hidden, layers, inter, heads = s["llm"]
    v_hidden, v_layers, v_inter, v_heads, patch, size = s["vision"]
    text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=s["vocab"])
    vision = CLIPVisionConfig(hidden_size=v_hidden, num_hidden_layers=v_layers, intermediate_size=v_inter,
                              num_attention_heads=v_heads, patch_size=patch, image_size=size)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         image_seq_length=(size // patch) ** 2, vision_feature_layer=-2)
    config.pad_token_id = processor.tokenizer.pad_token_id
    with torch.device("cuda" if dtype == torch.bfloat16 else "cpu"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(out)
    del model
    processor.image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
    processor.patch_size = patch
    processor.save_pretrained(out)
    return out


def one_rank(gpu: bool):
    """This process as rank 0 of a one-rank group (NCCL on GPU, gloo on CPU), as a trial's worker is; its device."""
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    return torch.device("cuda", 0) if gpu else torch.device("cpu")


def stage2_model(method: str, model_size: str, shape: str | None, steps: int, batch_size: int, gpu: bool, tmp: Path,
                 loader_workers: int = 0, **settings):
    """A trial's stage-2 model as the worker builds it, on the world's data: from the zoo's stage 1, or of
    `shape` (random weights) at its tower's resolution. Returns (ctx, model, counts); peak memory counts from
    before the model is loaded."""
    import torch

    import zoo
    from trainables import worker
    from trainables.config import TrialConfig
    from trainables.methods import METHODS, apply_stage
    from trainables.model import num_image_tokens
    from trainables.prepare import prepare

    device = one_rank(gpu)
    cfg = TrialConfig(method=method, model_size=model_size, stage1_steps=0, batch_size=batch_size, stage2_steps=steps,
                      use_gpu=gpu, eval_samples=1, max_length=1024 if shape else TrialConfig.max_length,
                      loader_workers=loader_workers, checkpoint_every=0, **settings)
    _, data = prepare(zoo.world_dir(), [cfg], tmp, progress=False)
    ctx = worker.setup(cfg, 0, 1, device, data, tmp)
    m = METHODS[method]
    if shape:
        base = shaped_base(shape, ctx.processor, tmp / "base", torch.bfloat16 if gpu else torch.float32)
        ctx.image_tokens = num_image_tokens(ctx.processor)  # the shaped tower's: 576 at 336 px, patch 14
    else:
        base, _ = worker.stage1(ctx)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    model, counts = apply_stage(m.load(base, cfg), m.stage2, cfg, m.wrap)
    if gpu and not m.quantize_base:
        model = model.to(device)
    return ctx, model, counts


def measure(method: str, model_size: str, shape: str | None, steps: int, batch_size: int, gpu: bool,
            zero_stage: int = 2) -> dict:
    """One method in this process: build, tune `steps` steps under ZeRO-`zero_stage`, report."""
    from trainables import worker

    with tempfile.TemporaryDirectory() as tmp:
        ctx, model, counts = stage2_model(method, model_size, shape, steps, batch_size, gpu, Path(tmp),
                                          zero_stage=zero_stage)
        _, seconds, _ = worker.train(ctx, model, worker.param_groups(model, ctx.cfg), ctx.dataset("train"), steps,
                                     "stage2")
        peak, source = worker.peak_memory_gb(ctx.device)
        device = ctx.device
    return dict(method=method, model=shape or model_size, device=worker.device_name(device), peak_gb=round(peak, 3),
                peak_source=source, trainable_params=sum(counts.values()), seconds_per_step=round(seconds / steps, 4),
                steps=steps, batch_size=batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["full", "lora", "qlora", "mma"])
    p.add_argument("--model-size", default="3.6m", help="zoo LLM (ignored with --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="build a LLaVA of this shape from a config instead")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu", action="store_true", help="one CUDA device, bf16")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.one:
        print(result_line(measure(args.methods[0], args.model_size, args.shape, args.steps,
                                             args.batch_size, args.gpu)), flush=True)
        return 0
    rows = []
    for method in args.methods:
        cmd = [sys.executable, "-m", "bench.memory", "--one", "--methods", method, "--model-size", args.model_size,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size)] + \
              (["--shape", args.shape] if args.shape else []) + (["--gpu"] if args.gpu else [])
        t0 = time.perf_counter()
        try:
            rows.append(run_child(cmd))
        except ChildFailed as failed:
            print(f"{method}: failed\n{failed.stderr[-3000:]}", file=sys.stderr)
            continue
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| method | model | device | peak memory (GB) | trainable params | s / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['model']} | {r['device']} | {r['peak_gb']:.2f} ({r['peak_source']}) | "
              f"{r['trainable_params']:,} | {r['seconds_per_step']:.3f} |")
    return 0 if len(rows) == len(args.methods) else 1


if __name__ == "__main__":
    sys.exit(main())
