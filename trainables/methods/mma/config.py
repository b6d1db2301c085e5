"""MMAConfig: the settings of LaVIN's Mixture-of-Modality Adaptation, saved beside its weights.

Field names are TrialConfig's (one name per idea); `from_trial` is the only bridge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_NAME = "mma_config.json"


def _doc(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class MMAConfig:
    adapter_dim: int = _doc("bottleneck width of each MM-Adapter (LaVIN: 8)", default=8)
    router_temperature: float = _doc("softmax temperature of the modality routers (LaVIN: 10)", default=10.0)
    neck_dim: int = _doc("hidden width of the visual neck's MLP (LaVIN: 128)", default=128)
    neck_every: int = _doc("the neck takes the [CLS] token of every n-th vision layer (LaVIN: 4 of 24)",
                           default=4)
    base_model_name_or_path: str = _doc("the LLaVA checkpoint the adapters were trained on (as PEFT's field)",
                                        default="")

    @classmethod
    def from_trial(cls, cfg) -> "MMAConfig":
        return cls(adapter_dim=cfg.adapter_dim, router_temperature=cfg.router_temperature,
                   neck_dim=cfg.neck_dim, neck_every=cfg.neck_every)

    def neck_layers(self, num_layers: int) -> tuple[int, ...]:
        """Indices into the vision tower's hidden_states (0 = embeddings): n, 2n, ... up to the last layer."""
        layers = tuple(range(self.neck_every, num_layers + 1, self.neck_every))
        if not layers:
            raise ValueError(f"neck_every={self.neck_every} selects no layer of a {num_layers}-layer vision tower")
        return layers

    def save(self, out_dir) -> None:
        (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, mma_dir) -> "MMAConfig":
        values = json.loads((Path(mma_dir) / CONFIG_NAME).read_text())
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{CONFIG_NAME}: unknown key {unknown[0]!r}")
        return cls(**values)
