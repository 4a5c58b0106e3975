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

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from icl_lens.files import atomic_write_bytes, atomic_write_text
from icl_lens.study.records import Records

__all__ = [
    "Checkpoints",
    "Stages",
    "atomic_write_bytes",
    "atomic_write_text",
    "fingerprint_model",
    "fingerprint_task",
]


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


def fingerprint_model(model) -> str:
    """Cheap identity of the weights (shapes and float64 sums), for checkpoint checks."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            h.update(
                f"{name}{tuple(p.shape)}{x.sum().item():.10e}{x.abs().sum().item():.10e}".encode()
            )
    return h.hexdigest()[:16]


def fingerprint_task(task) -> str:
    h = hashlib.sha256(repr(task.spec).encode())
    for split in (task.train, task.validation):
        for ex in split:
            h.update(repr((sorted(ex.fields.items()), ex.label)).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


class Stages:
    """Finished stages: checkpointed (``store``), shared between calls (``memo``: the ZSL
    recordings, which do not depend on the demonstrations), counted on a progress bar."""

    def __init__(self, store, memo, memo_key, bar):
        self.store, self.memo, self.memo_key, self.bar = store, memo, memo_key, bar

    def get(self, name: str, compute: Callable[[], Any], *, share: bool = False) -> Any:
        self.bar.set_postfix_str(name)
        if share and self.memo is not None:
            key = (self.memo_key, name)
            inner = compute

            def compute():
                if key not in self.memo:
                    self.memo[key] = inner()
                return self.memo[key]

        if self.store is not None:
            found = self.store.get(name)
            if found is not None:
                self.bar.update(1)
                return found
        value = compute()
        if self.store is not None:
            value = self.store.put(name, value)
        self.bar.update(1)
        return value

    def records(self, name: str, compute: Callable[[], Records], **kw) -> Records:
        return Records.from_dict(self.get(name, lambda: compute().to_dict(), **kw))
