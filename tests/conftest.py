"""Test setup: never touch a hub, keep CPU threads predictable."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.manual_seed(0)
# the test models are tiny: one intra-op thread beats several, above all on a shared CPU
torch.set_num_threads(1)
