"""What the laptop study builds once and caches: the model zoo, the synthetic world, and the cache discipline.

    python -m zoo                  # build both (once) and print where they live
    python -m zoo.world OUT_DIR    # write the synthetic world as a LLaVA-format dataset

The bottom layer: it imports nothing of the project's other packages (tests/test_layers.py).
"""

import importlib

# Imported when first asked for (PEP 562), not here: `python -m zoo.world` would otherwise find zoo.world
# imported (through zoo.models) before runpy runs it, and print runpy's RuntimeWarning before its output.
_FROM = {"cache_dir": "zoo.cache", **{name: "zoo.models" for name in (
    "CHAT_TEMPLATE", "IMAGE_SIZES", "IMAGE_TOKEN", "LLM_SIZES", "SEED", "ZOO_VERSION", "ensure_world", "ensure_zoo",
    "llm_path", "tokenizer_path", "vision_path", "world_dir", "zoo_dir")}}

__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name in _FROM:
        return getattr(importlib.import_module(_FROM[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
