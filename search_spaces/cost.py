"""Score against cost: a multi-objective LoRA search that stops weak trials early and spends within a budget.

    python -m study.run search_spaces/cost.py [--budget-gpu-hours H | --budget-dollars D] [--dry-run]

The search maximises the score and minimises GPU-hours per node at once (Optuna's
multi-objective TPE), so it spends its trials along the cost-performance frontier instead
of around the single best score. ASHA stops a trial whose interim score (every 25 stage-2
steps, on 64 held-out questions) is not in the better half of those that reached step 100
(or 200); a stopped trial keeps the cost it spent and stays off the frontier. The paper's
setting (alpha = 2 x rank at a high learning rate) is tried first.
"""

from study.space import alpha_per_rank, asha, choice, loguniform

NAME = "cost"
NUM_SAMPLES = 16
OBJECTIVES = {"score": "max", "gpu_hours": "min"}
SCHEDULER = asha(grace_steps=100, reduction_factor=2)  # bench.search: better than 50/3 here; --smoke: 5, 10
BUDGET_GPU_HOURS = 0.06          # about 12 minutes of two trials at a time on a laptop's 2 cores
FIXED = {"method": "lora", "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300,
         "interim_every": 25, "interim_samples": 64}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),
    "lora_rank": choice([8, 16, 32, 64]),
    "lora_alpha": alpha_per_rank(choice([0.5, 1, 2, 4])),
    "lr": loguniform(1e-4, 1e-2),
}
SEED_POINTS = [{"model_size": "1m", "lora_rank": 16, "lora_alpha": 32, "lr": 3e-3}]  # the paper's alpha = 2 x rank
SMOKE = {"stage1_steps": 5, "stage2_steps": 20, "batch_size": 8, "eval_samples": 32, "interim_every": 5,
         "interim_samples": 8}
