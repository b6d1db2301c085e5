"""The grid bench.search replays strategies against: model size x LoRA rank x alpha/rank x learning rate.

    python -m bench.search grid        # runs this study (~25 min on 2 cores) and writes bench/search_grid.csv

Every combination once, each with interim evaluations every 25 stage-2 steps (what an
early-stopping replay needs), at the default study's budget per trial.
"""

from study.space import alpha_per_rank, choice

NAME = "search_grid"
SAMPLER = "grid"
NUM_SAMPLES = 36
FIXED = {"method": "lora", "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300,
         "interim_every": 25, "interim_samples": 64}
SPACE = {
    "model_size": choice(["0.3m", "1m"]),
    "lora_rank": choice([8, 32]),
    "lora_alpha": alpha_per_rank(choice([1, 2, 4])),   # the paper's best is 2
    "lr": choice([1e-3, 3e-3, 1e-2]),
}
SMOKE = {"stage1_steps": 2, "stage2_steps": 50, "batch_size": 8, "eval_samples": 16, "interim_every": 25,
         "interim_samples": 8}
