"""The scaling paper's Table 3 in miniature, over 3 seeds: model size x image resolution x data mixing.

    python -m study.run search_spaces/paper_table3.py

Lu et al. 2023 (Table 3) find that a larger LLM helps, that 336 px beats 224 px, and
that mixing language-only instructions into visual instruction tuning keeps the LLM's
text skill (and helps a little). Here: LoRA at the paper's best setting (alpha = 2 x
rank, a high learning rate), the zoo's two smaller LLMs, its tower at 32 and 48 px (224
and 336 px in miniature), 0% or 20% language-only data, each configuration at 3 seeds
(24 trials). docs/REPORT.md pools the three paper studies' trials: directions 2 and 6 come from this
one, direction 1 from all three.
"""
from study.space import choice

NAME = "paper_table3"
SAMPLER = "grid"
SEEDS = 3
NUM_SAMPLES = 8  # 2 sizes x 2 resolutions x 2 mixes, each at 3 seeds: 24 trials
FIXED = {"method": "lora", "lora_rank": 16, "lora_alpha": 32, "lr": 3e-3,
         "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300}
SPACE = {
    "model_size": choice(["0.3m", "1m"]),
    "image_size": choice([32, 48]),
    "mix_ratio": choice([0.0, 0.2]),
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
