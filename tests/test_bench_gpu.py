"""bench/gpu.py, the GPU path's prepared script: its arithmetic, and that it runs (on the CPU, --dry)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu

REPO = Path(__file__).parent.parent


def test_model_flops_per_token_follow_the_palm_count():
    # a 1B LLM (N = 1e9, 16 layers of width 2048) at 1,000 tokens of context
    attention = 12 * 16 * 2048 * 1000
    assert gpu.model_flops("full", 10**9, 16, 2048, 1000) == 6e9 + attention
    assert gpu.model_flops("lora", 10**9, 16, 2048, 1000) == 4e9 + attention  # frozen weights: no weight gradients


def test_the_cards_peak_comes_from_its_name():
    assert gpu.peak_tflops("NVIDIA H200") == 989.4
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("cpu") is None  # no MFU without a known peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_script_says_so_and_how_to_check_it():
    r = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: no CUDA GPU here; run with --dry" in r.stderr


@pytest.mark.slow
def test_the_throughput_and_evaluation_parts_run_dry(tmp_path):
    # in CI this runs before any other test has built the zoo: the script builds what its parts read
    out = tmp_path / "rows.md"
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry", "--parts", "cd", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    text = out.read_text()
    for method in ("full", "lora"):  # both loops measured on the same batches, and their ratio
        assert re.search(rf"\| {method} \| trial \| [\d,]+ \| [\d.]+ \|  \| [\d.]+x \|", text), text
        assert re.search(rf"\| {method} \| trainer \| [\d,]+ \| [\d.]+ \|  \|  \|", text), text
    # greedy answers do not depend on the batch size (DESIGN.md), here in fp32 on the CPU
    assert re.search(r"\| 16 \| 0 \| [\d.]+ \|", text) and re.search(r"\| 64 \| 0 \| [\d.]+ \|", text), text
