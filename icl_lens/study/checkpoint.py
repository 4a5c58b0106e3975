"""Atomic files and a resumable store of finished pipeline stages.

Every file is written to a temporary name in the same directory and moved into place
with ``os.replace``, so an interruption leaves either the old file or the new one,
never half of one. :class:`Checkpoints` keeps one file per finished stage (a setting's
recordings, one learning rate of the grid, ...) next to the configuration that
produced them; a rerun with the same configuration loads them instead of recomputing,
and a different configuration is refused rather than mixed in.

>>> import tempfile
>>> store = Checkpoints(tempfile.mkdtemp(), {"shots": 4})
>>> store.get("zsl") is None
True
>>> store.put("zsl", {"accuracy": 0.5})["accuracy"]
0.5
>>> Checkpoints(store.directory, {"shots": 4}).get("zsl")
{'accuracy': 0.5}
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from icl_lens.files import atomic_write_bytes, atomic_write_text

__all__ = ["Checkpoints", "atomic_write_bytes", "atomic_write_text"]


def _file_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", stage) + ".pt"


class Checkpoints:
    """Finished stages of one run under ``directory``, valid for one ``config``.

    ``config`` (JSON-able) is written to ``directory/config.json`` on first use; opening
    the directory later with a different config raises ``ValueError`` naming the keys
    that differ.
    """

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any]):
        self.directory = Path(directory)
        self.config = json.loads(json.dumps(config))
        path = self.directory / "config.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != self.config:
                keys = sorted(k for k in {*old, *self.config} if old.get(k) != self.config.get(k))
                raise ValueError(
                    f"{self.directory} holds checkpoints of a run with other settings "
                    f"(differing: {', '.join(keys)}); use another output directory or "
                    "delete this one to start over"
                )
        else:
            atomic_write_text(path, json.dumps(self.config, indent=2, sort_keys=True))
        self.loaded: list[str] = []
        self.computed: list[str] = []

    def path(self, stage: str) -> Path:
        return self.directory / _file_name(stage)

    def get(self, stage: str) -> Any | None:
        path = self.path(stage)
        if not path.exists():
            return None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        self.loaded.append(stage)
        return obj

    def put(self, stage: str, obj: Any) -> Any:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        atomic_write_bytes(self.path(stage), buffer.getvalue())
        self.computed.append(stage)
        return obj
