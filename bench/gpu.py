"""The GPU path in one prepared script: a few minutes on one GPU machine, rows for BENCHMARKS.md ("GPU").

    python -m bench.gpu [--out gpu.md]        # on a machine with a CUDA GPU (bf16)
    python -m bench.gpu --dry [--out dry.md]  # the same code on the CPU with tiny shapes (fp32): that it runs

(a) A smoke study with `use_gpu: True` end to end (bf16; 2 workers over NCCL where 2 GPUs fit, else 1): its
    trial runs must be FINISHED with a score, the GPU's name as `device` and `peak_mem_source` gpu_allocated.
(b) Peak memory of full, LoRA and QLoRA stage 2 for a Vicuna-7B-shaped LLM with a CLIP-L/336-shaped tower
    (bench.memory: random weights from configs, a few steps, each method in its own process). The scaling
    paper's point (Table 4): QLoRA far below LoRA, LoRA far below full. A method that does not fit says so.
(c) Stage-2 tokens/s and MFU of a 1B-class LLaVA (bench.memory's "1b" shape) for full and LoRA: the trial's
    worker loop (DeepSpeed ZeRO-2, bf16, our data path) against Hugging Face `Trainer` + PEFT (bf16 autocast,
    torch AdamW) on the same model, batches (in the same order) and steps. MFU = model FLOPs per second / the
    card's dense bf16 peak, with model FLOPs per token = 6N (full) or 4N (LoRA: frozen weights need no weight
    gradients) over the LLM's N weights, plus attention's 12 x layers x width x sequence (PaLM, appendix B).
    Goals (the speed issue): MFU >= 45% for full; the trial loop >= 1.3x the Trainer's tokens/s.
(d) Evaluation answers of the zoo's 1m LLaVA in bf16 at batch 1, 16 and 64 (greedy): how many differ from
    batch 1 (goal 0: DESIGN.md promises the same answers at any batch size), and questions/s at 64 vs 1.

Every measurement runs in its own process (peak memory is per process). With --dry the card's peak is unknown
(MFU is not computed) and the numbers only show that each part runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ChildFailed, result_line, run_child

# Dense bf16 peak (TFLOP/s) by the card's name (vendor spec sheets: H100/H200 SXM 989, A100 312, L40S 362).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
REPO = Path(__file__).resolve().parent.parent


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def child(part: str, *args: str, timeout: float = 900) -> dict:
    """`python -m bench.gpu --one PART ARGS` in its own process; its RESULT line, or {"error": ...}."""
    cmd = [sys.executable, "-m", "bench.gpu", "--one", part, *args]
    try:
        return run_child(cmd, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    except ChildFailed as failed:
        tail = (failed.stderr or failed.stdout).strip().splitlines()
        oom = any("out of memory" in line.lower() for line in tail)
        return {"error": "out of memory" if oom else (tail[-1] if tail else "no result")}


# --- (a) a smoke study on the GPU ---------------------------------------------------------------------------

SPACE = """\
from study.space import choice

NAME = "gpu-smoke"
NUM_SAMPLES = 2
FIXED = {{"method": "lora", "model_size": "1m", "use_gpu": {gpu}, "num_workers": {workers}, "stage1_steps": 20,
         "stage2_steps": 40, "batch_size": 16, "eval_samples": 64}}
SPACE = {{"lr": choice([1e-3, 3e-3])}}
"""


def smoke_study(work: Path, gpu: bool) -> list[dict]:
    from mlflow.tracking import MlflowClient

    workers = 2 if gpu and gpu_count() >= 2 else 1
    space = work / "gpu_smoke.py"
    space.write_text(SPACE.format(gpu=gpu, workers=workers))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "study.run", str(space), "--storage", str(work / "studies"), "--tracking-uri", uri]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    wall = time.perf_counter() - t0
    if r.returncode:
        return [{"status": f"study failed (exit {r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"}]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gpu-smoke")
    rows = []
    for run in client.search_runs([exp.experiment_id], "tags.`mmscale.trial_id` != ''"):
        m, t = run.data.metrics, run.data.tags
        rows.append(dict(status=run.info.status, device=t.get("device"), world=t.get("world_size"),
                         peak_source=t.get("peak_mem_source"), score=m.get("score"), score_n=m.get("score_n"),
                         samples_per_s=m.get("samples_per_s"), peak_mem_gb=m.get("peak_mem_gb"),
                         gpu_hours=m.get("gpu_hours"), overhead_s=m.get("time_overhead_s"), study_wall_s=wall))
    return rows


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- (c) tokens/s and MFU: the trial's loop against Hugging Face Trainer + PEFT -----------------------------

def llm_shape(model) -> tuple[int, int, int]:
    """(weights N of the LLM and its LM head, layers, width), LoRA's own weights not counted."""
    text = model.config.text_config if hasattr(model.config, "text_config") else model.get_base_model().config.text_config
    n = sum(p.numel() for name, p in model.named_parameters()
            if ("language_model" in name or "lm_head" in name) and "lora_" not in name)
    return n, text.num_hidden_layers, text.hidden_size


def model_flops(method: str, weights: int, layers: int, width: int, seq: float) -> float:
    """Training FLOPs per token: 6N for full fine-tuning (forward 2N, backward 4N), 4N when the weights are frozen
    (LoRA: the backward pass computes activation gradients only; the adapters' own FLOPs are left out), plus
    attention's 12 x layers x width x sequence length (PaLM, Chowdhery et al. 2022, appendix B)."""
    return (6 if method == "full" else 4) * weights + 12 * layers * width * seq


def batches_in_order(ctx, steps: int) -> list[int]:
    """The dataset indices of every sample the trial's loop trains on, in its order (trainables.data.loader)."""
    from trainables.data.loader import StepBatches

    dataset = ctx.dataset("train")
    sampler = StepBatches(len(dataset), ctx.cfg.batch_size, 0, 1, ctx.cfg.seed, steps)
    return [i for batch in sampler for i in batch]


def throughput(loop: str, method: str, shape: str, steps: int, batch: int, gpu: bool) -> dict:
    """`steps` stage-2 steps of `shape` in this process by `loop` ("trial" or "trainer"); tokens/s and MFU."""
    from bench.memory import stage2_model
    from trainables import worker

    with tempfile.TemporaryDirectory() as tmp:
        ctx, model, _ = stage2_model(method, "1m", shape, steps, batch, gpu, Path(tmp),
                                     loader_workers=1, lr=1e-4 if method == "full" else 2e-4)
        order = batches_in_order(ctx, steps)
        dataset = ctx.dataset("train")
        collate = ctx.collate()
        tokens = sum(int(collate([dataset[i] for i in order[k:k + batch]])["attention_mask"].sum())
                     for k in range(0, len(order), batch))
        n, layers, width = llm_shape(model)
        seq = tokens / (steps * batch)
        if loop == "trial":
            _, seconds, _ = worker.train(ctx, model, worker.param_groups(model, ctx.cfg), dataset, steps, "stage2")
        else:
            seconds = trainer_seconds(ctx, model, [dataset[i] for i in order], steps, batch, gpu, Path(tmp))
    flops = model_flops(method, n, layers, width, seq) * tokens
    name = worker.device_name(ctx.device)
    peak = peak_tflops(name) if gpu else None
    return dict(loop=loop, method=method, shape=shape, device=name, steps=steps, batch=batch, tokens=tokens,
                seconds=seconds, tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12,
                mfu=flops / seconds / (peak * 1e12) if peak else None, llm_params=n)


def trainer_seconds(ctx, model, items: list[dict], steps: int, batch: int, gpu: bool, tmp: Path) -> float:
    """Hugging Face Trainer on `items` in their order (no shuffling: the trial loop's batches), torch AdamW,
    bf16 autocast on GPU, gradient clipping at 1.0 as the trial's DeepSpeed config; the wall time of train()."""
    import torch
    from transformers import Trainer, TrainingArguments

    collate = ctx.collate()

    def collator(rows):
        out = collate(rows)
        out.pop("index")
        return out

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=ctx.cfg.lr, lr_scheduler_type="cosine",
                             warmup_steps=ctx.cfg.warmup_ratio,  # a float below 1 is a share of the steps
                             weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=gpu, use_cpu=not gpu,
                             report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                             dataloader_num_workers=1, seed=ctx.cfg.seed, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=items, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


# --- (d) evaluation answers by batch size ----------------------------------------------------------------------

def answers_by_batch(gpu: bool, questions: int, sizes: list[int]) -> dict:
    """The zoo's 1m LLaVA after stage 1, in bf16 on GPU (fp32 on CPU): greedy answers at each batch size."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from bench.memory import one_rank
    from trainables import worker
    from trainables.config import TrialConfig
    from trainables.data.loader import eval_loader
    from trainables.evaluate import generate_answers
    from trainables.prepare import prepare
    import zoo

    device = one_rank(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrialConfig(model_size="1m", stage1_steps=30, use_gpu=gpu, loader_workers=0)
        _, data = prepare(zoo.world_dir(), [cfg], Path(tmp), progress=False)
        ctx = worker.setup(cfg, 0, 1, device, data, Path(tmp))
        base, _ = worker.stage1(ctx)
        model = LlavaForConditionalGeneration.from_pretrained(
            base, dtype=torch.bfloat16 if gpu else torch.float32).to(device).eval()
        dataset = ctx.dataset("eval", limit=questions)
        found, seconds = {}, {}
        for size in sizes:
            loader = eval_loader(dataset, list(range(len(dataset))), size, ctx.collate(left=True))
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            found[size] = generate_answers(model, loader, ctx.tokenizer, cfg.max_new_tokens, device)
            if gpu:
                torch.cuda.synchronize()
            seconds[size] = time.perf_counter() - t0
    first = sizes[0]
    return dict(device=worker.device_name(device), dtype="bf16" if gpu else "fp32", questions=len(found[first]),
                changed={size: sum(found[size][i] != found[first][i] for i in found[first]) for size in sizes},
                questions_per_s={size: len(found[size]) / seconds[size] for size in sizes})


# --- the script ---------------------------------------------------------------------------------------------------

def run_all(dry: bool, work: Path, parts: str = "abcd") -> list[str]:
    gpu = not dry
    out = [f"`python -m bench.gpu{' --dry' if dry else ''}` ({time.strftime('%Y-%m-%d')})", ""]
    if "a" in parts:
        out += part_a(work, gpu)
    if "b" in parts:
        out += part_b(dry, gpu)
    if "c" in parts:
        out += part_c(dry, gpu)
    if "d" in parts:
        out += part_d(dry, gpu)
    return out


def part_a(work: Path, gpu: bool) -> list[str]:
    print("(a) smoke study", flush=True)
    rows = smoke_study(work, gpu)
    out = ["(a) smoke study, `use_gpu: " + str(gpu) + "`, zoo 1m LoRA, 2 trials:", "",
            "| status | device | workers | peak source | score (n) | samples/s | peak mem (GB) | GPU-hours | "
            "overhead (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("score") is None:  # the study failed, or a trial did: its status says so, and the rest is empty
            out.append(f"| {r['status']} | {r.get('device') or ''} | {r.get('world') or ''} | | | | | | |")
            continue
        out.append(f"| {r['status']} | {r['device']} | {r['world']} | {r['peak_source']} | {r['score']:.1f} "
                   f"({r['score_n']:.0f}) | {r['samples_per_s']:.0f} | {r['peak_mem_gb']:.2f} | "
                   f"{r['gpu_hours']:.2e} | {r['overhead_s']:.1f} |")
    return out


def part_b(dry: bool, gpu: bool) -> list[str]:
    print("(b) peak memory", flush=True)
    shape = "tiny" if dry else "7b"
    out = ["", f"(b) peak memory, {'tiny' if dry else 'Vicuna-7B'}-shaped LLM + CLIP-L/336-shaped tower, "
                "batch 4, 3 steps (QLoRA also under ZeRO-3, its 4-bit weights sharded):", "",
            "| method | peak memory (GB) | source | trainable params | s / step |", "|---|---|---|---|---|"]
    for method, zero in (("full", 2), ("lora", 2), ("qlora", 2), ("qlora", 3)):
        r = child("memory", method, shape, "3", "4", str(gpu), str(zero))
        label = f"{method}, ZeRO-{zero}"
        print(f"  {label}: {r}", flush=True)
        if "error" in r:
            out.append(f"| {label} | {r['error']} | | | |")
        else:
            out.append(f"| {label} | {r['peak_gb']:.2f} | {r['peak_source']} | {r['trainable_params']:,} | "
                       f"{r['seconds_per_step']:.3f} |")
    return out


def part_c(dry: bool, gpu: bool) -> list[str]:
    print("(c) throughput", flush=True)
    shape, steps, batch = ("tiny", 4, 4) if dry else ("1b", 30, 8)
    out = ["", f"(c) stage 2 of a {shape}-shaped LLaVA, batch {batch}, {steps} steps, same batches in the same order:",
            "", "| method | loop | tokens/s | TFLOP/s | MFU | trial / Trainer |", "|---|---|---|---|---|---|"]
    for method in ("full", "lora"):
        got = {loop: child("throughput", loop, method, shape, str(steps), str(batch), str(gpu))
               for loop in ("trial", "trainer")}
        print(f"  {method}: {got}", flush=True)
        for loop, r in got.items():
            if "error" in r:
                out.append(f"| {method} | {loop} | {r['error']} | | | |")
                continue
            ratio = (got["trial"]["tokens_per_s"] / got["trainer"]["tokens_per_s"]
                     if loop == "trial" and "error" not in got["trainer"] else None)
            mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            vs = "" if ratio is None else f"{ratio:.2f}x"
            out.append(f"| {method} | {loop} | {r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} | {vs} |")
    return out


def part_d(dry: bool, gpu: bool) -> list[str]:
    print("(d) evaluation by batch size", flush=True)
    r = child("eval", str(gpu), "64" if dry else "512")
    out = ["", "(d) greedy answers of the zoo's 1m LLaVA by batch size:", ""]
    if "error" in r:
        out.append(f"failed: {r['error']}")
    else:
        out += [f"| batch | answers that differ from batch 1 (of {r['questions']}) | questions/s ({r['dtype']}) |",
                "|---|---|---|"]
        out += [f"| {size} | {r['changed'][size]} | {r['questions_per_s'][size]:.1f} |" for size in r["changed"]]
        out.append(f"\nquestions/s at 64 / at 1: {r['questions_per_s']['64'] / r['questions_per_s']['1']:.1f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="on the CPU, tiny shapes, fp32: the script runs, no numbers")
    p.add_argument("--out", help="also write the rows (Markdown) to this file")
    p.add_argument("--parts", default="abcd", help="which parts to run (default all: abcd)")
    p.add_argument("--work", default=None, help="where studies and scratch go (default: a temporary directory)")
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a child: one measurement
    args = p.parse_args(argv)
    if args.one:
        part, *rest = args.one
        if part == "memory":
            from bench.memory import measure

            method, shape, steps, batch, gpu, zero = rest
            result = measure(method, "1m", shape, int(steps), int(batch), gpu == "True", int(zero))
        elif part == "throughput":
            loop, method, shape, steps, batch, gpu = rest
            result = throughput(loop, method, shape, int(steps), int(batch), gpu == "True")
        else:
            gpu, questions = rest
            result = answers_by_batch(gpu == "True", int(questions), [1, 16, 64])
        print(result_line(result), flush=True)
        return 0
    if not args.dry and not gpu_count():
        print("error: no CUDA GPU here; run with --dry to check the script on the CPU", file=sys.stderr)
        return 2
    import zoo

    zoo.ensure_zoo(), zoo.ensure_world()  # before the children, which only read them (a fresh machine has none)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines = run_all(args.dry, work, args.parts)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
