"""Full fine-tuning: stage 2 trains the whole LLM and the projector (the paper's costliest, strongest row).

    python -m study.run search_spaces/full.py

The scaling paper fine-tunes 7B-65B fully at lr 2e-5. Our zoo models are ~1000x
smaller and take larger steps (as for LoRA, about 10-50x), so the range spans
1e-4..3e-3 around that anchor. ZeRO-3 (`zero_stage: 3`) shards the full optimizer
state when a model no longer fits; ZeRO-2 is enough for the zoo.
"""
from study.space import choice, loguniform

NAME = "full"
NUM_SAMPLES = 6
FIXED = {"method": "full", "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300,
         "zero_stage": 2}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),
    "lr": loguniform(1e-4, 3e-3),
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
