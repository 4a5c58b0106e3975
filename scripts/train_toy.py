"""Train the embedded toy model and write it to icl_lens/toy/checkpoint/.

    HF_HUB_OFFLINE=1 python scripts/train_toy.py            # the packaged checkpoint
    python scripts/train_toy.py --steps 3 --out /tmp/toy    # a quick smoke run

Deterministic given --seed, --steps and --threads (default 1 thread).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "icl_lens" / "toy" / "checkpoint"
DEFAULT_STEPS = 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--label-weight", type=float, default=5.0)
    parser.add_argument("--canonical-share", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--min-lr-ratio", type=float, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--probe-every", type=int, default=200, help="0: no ICL probe")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from icl_lens.toy.train import TrainConfig, train

    config = TrainConfig(seed=args.seed, label_weight=args.label_weight)
    for name in ("canonical_share", "lr", "min_lr_ratio"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    train(
        config, args.steps, out_dir=args.out, log_every=args.log_every, probe_every=args.probe_every
    )
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
