"""MMA (LaVIN's Mixture-of-Modality Adaptation): routed MM-Adapters in the vision tower and the LLM, one stage.

    python -m study.run search_spaces/mma.py

LaVIN trains only its adapters (3.8M parameters at 7B) at lr about 1e-3 for batch 32,
weight decay 0.02, with text-only and image-text samples mixed in every batch; its
adapters are 8 wide and route with temperature 10. The range keeps lr around that
anchor and asks whether a wider bottleneck or a softer router pays. The zoo's vision
tower has 4 layers where LaVIN's has 24, so the neck reads every layer's [CLS]
(neck_every 1: 4 tokens, close to LaVIN's 6) instead of every 4th (1 token).
"""
from study.space import choice, loguniform

NAME = "mma"
NUM_SAMPLES = 6
FIXED = {"method": "mma", "stage2_steps": 250, "batch_size": 32, "eval_samples": 300, "weight_decay": 0.02,
         "mix_ratio": 0.2, "neck_every": 1, "neck_dim": 128}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),
    "lr": loguniform(3e-4, 1e-2),
    "adapter_dim": choice([8, 16]),
    "router_temperature": choice([5.0, 10.0]),
}
SMOKE = {"stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
