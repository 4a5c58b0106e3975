"""What defines a momentum study: :class:`StudyConfig`, the variant names, the held-out
seeds, and the flat metrics of one run.

>>> parse_variant("eta0.9"), parse_variant("learned"), parse_variant("vanilla")
((0.9, False), (0.5, True), (None, False))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["GROUPS", "KINDS", "StudyConfig", "parse_variant", "run_metrics"]

PPL_SEED_BASE = 500_000
CANONICAL_SEED_BASE = 600_000
ARBITRARY_SEED_BASE = 700_000
KINDS = ("canonical", "arbitrary")
GROUPS = ("overall", *KINDS)


@dataclass
class StudyConfig:
    """Everything that defines a study; the defaults are the documented run (docs/momentum.md).

    Every :class:`icl_lens.toy.train.TrainConfig` field is set from here (the toy trainer's
    own defaults may change); each run records the resulting ``train_config``.
    """

    variants: tuple[str, ...] = ("vanilla", "eta0.5", "eta0.9", "learned")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1200
    batch_size: int = 16
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 256
    max_shots: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_weight: float = 5.0
    canonical_share: float = 0.3
    sinusoidal_positions: bool = True
    learned_eta_init: float = 0.5
    eta_lr_scale: float = 10.0
    eval_sequences: int = 256
    eval_instances: int = 32
    eval_queries: int = 8
    shots: tuple[int, ...] = (0, 4, 16)
    eval_batch_size: int = 64
    log_every: int = 100

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.shots = tuple(int(k) for k in self.shots)
        for v in self.variants:
            parse_variant(v, self.learned_eta_init)
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"duplicate variants in {self.variants}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if max(self.shots, default=0) > self.max_shots * 4:
            raise ValueError(f"shots {self.shots} are far beyond the trained max_shots")
        if self.eval_queries % 2 or self.eval_queries < 2:
            raise ValueError("eval_queries must be even (queries are class-balanced in pairs)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parse_variant(name: str, learned_init: float = 0.5) -> tuple[float | None, bool]:
    """``(eta, learnable)`` of a variant name: ``vanilla``, ``eta<float>`` or ``learned``.

    ``vanilla`` gives ``(None, False)``; ``learned`` gives ``(learned_init, True)``.

    >>> parse_variant("eta0.25")
    (0.25, False)
    """
    if name == "vanilla":
        return None, False
    if name == "learned":
        return float(learned_init), True
    if name.startswith("eta"):
        try:
            eta = float(name[3:])
        except ValueError:
            eta = float("nan")
        if 0.0 <= eta <= 1.0:
            return eta, False
    raise ValueError(f"unknown variant {name!r}: use vanilla, learned or eta<float in [0, 1]>")


def run_metrics(run: dict[str, Any], shots: Sequence[int]) -> dict[str, float]:
    """The flat metrics of one run: ``val_ppl``, ``val_loss``, ``icl_{group}_k{k}``, ..."""
    out = {
        "val_ppl": run["val_ppl"],
        "val_loss": run["val_loss"],
        "val_label_loss": run["val_label_loss"],
    }
    for group in GROUPS:
        for k in shots:
            out[f"icl_{group}_k{k}"] = run["icl"][group][str(k)]
    if run.get("final_eta") is not None:
        flat = [e for row in run["final_eta"] for e in row]
        out["eta_mean"] = sum(flat) / len(flat)
    return out
