"""What the interventions learn on the held-out fit queries, never on the measured ones:
the fitted scale c_h of every head, the heads' ranking by necessity, and the task vector
with its layer (docs/interventions.md).

- c_h = sum_t <dz_t, u_t> / sum_t |u_t|^2 over the fit queries' prediction positions,
  the least-squares scalar of u onto dz: the best fixed multiple of the paper's update.
  u_t = dW_ICL q_t in the Blind forward, read as the head's ``hook_z`` under
  Transplant(that layer's heads, linear) minus z_B,t; dz_t, the change reading the
  demonstrations makes to the head's output, is read in the same forward: ``hook_z``
  under Restore(that layer's heads) minus z_B,t. In both the layers below are Blind, so
  the head has Blind's q_t and query-side keys and values, and the two differ only in
  how the demonstrations are read (softmax, or the relaxed linear form): under linear
  attention dz_t = u_t and c_h = 1 exactly. (At the first layer dz_t is z_ICL,t -
  z_B,t; above it, z_ICL,t - z_B,t would also hold what the layers below changed,
  which no update of this head's own can carry.) A head whose update is zero on every
  fit query (it sees no demonstration) gets 0.
- the ranking: every head by ``removed`` of its knockout on the fit queries' margins,
  most necessary first (the order of the top-k curves).
- the task vector (Hendel et al. 2023): the ICL forward's residual stream after layer L
  at the last position, averaged over the fit queries (their ``get_single_context_
  task_hiddens`` averages the last position's hidden states over other test inputs of
  the same demonstrations, roeehendel/icl_task_vectors ``core/task_vectors.py``
  L130-159), patched at the last position of the plain zero-shot forward (their
  ``HiddenInjector``, a forward hook on layer L's output, ``hidden_injector.py``
  L38-53); L chosen by accuracy over the layers on held-out queries (their
  ``task_vector_accuracy_by_layer`` on the dev datasets and ``max`` over it,
  ``core/task_vectors.py`` L48-56, L240-279), ties broken here by the mean margin.

>>> dz = torch.tensor([[[[2.0, 0.0]]], [[[1.0, 1.0]]]])   # 2 queries, 1 layer, 1 head
>>> u = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
>>> fitted_scales(dz, u).tolist()                         # (2 + 1) / (1 + 1)
[[1.5]]
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from icl_lens.analyses.recovery import label_margins
from icl_lens.hooks import interventions as iv

__all__ = ["choose_layer", "fit_stage", "fitted_scales", "rank_heads"]


def fitted_scales(
    dz: Float[Tensor, "query layer head d_head"], u: Float[Tensor, "query layer head d_head"]
) -> Float[Tensor, "layer head"]:
    """Per head the least-squares c with dz ~ c u over the queries (0 where u is 0)."""
    top = (dz.double() * u.double()).sum(dim=(0, 3))
    bottom = (u.double() ** 2).sum(dim=(0, 3))
    safe = torch.where(bottom > 0, bottom, torch.ones_like(bottom))
    return torch.where(bottom > 0, top / safe, torch.zeros_like(top)).float()


def rank_heads(
    icl: float, blind: float, knocked: Float[np.ndarray, "layer head"]
) -> tuple[list[tuple[int, int]], Float[np.ndarray, "layer head"]]:
    """Heads by ``removed`` of their knockout, (m(ICL) - m(X)) / (m(ICL) - m(Blind)),
    largest first (layer-major on ties); where ICL does not move the mean margin at
    all, by the drop m(ICL) - m(X). Returns the ranking and the removed values."""
    drop = icl - np.asarray(knocked, dtype=np.float64)
    effect = icl - blind
    removed = drop / effect if effect != 0 else np.full(drop.shape, np.nan)
    key = removed if effect != 0 else drop
    n_layers, n_heads = drop.shape
    order = np.argsort(-key.ravel(), kind="stable")
    return [(int(i // n_heads), int(i % n_heads)) for i in order], removed


def choose_layer(accuracy: np.ndarray, margin: np.ndarray) -> int:
    """The layer of the highest accuracy, ties to the highest mean margin, then the
    first."""
    order = np.lexsort((-np.asarray(margin), -np.asarray(accuracy)))
    return int(order[0])


def fit_stage(runner, queries, gold, label_ids, *, batch_size: int, progress: bool) -> dict:
    """Everything the fit queries give, as a checkpointable dict: ``scales``,
    ``ranking``, ``necessity``, ``task_vectors`` ``[layer, d_model]``, ``tv_layer``,
    ``tv_accuracy`` / ``tv_margin`` per layer, ``margins`` (ICL, Blind), ``n_fit``."""
    a = runner.adapter
    layers = range(a.n_layers)
    z_names = [a.name(layer, "z") for layer in layers]
    resid = [a.name(layer, "resid_post") for layer in layers]
    opts = {"batch_size": batch_size, "keep": label_ids, "progress": progress}
    base = runner.run(queries, [iv.icl(a), iv.blind(a)], capture=z_names + resid, **opts)
    per_layer = [[(layer, h) for h in range(a.n_heads)] for layer in layers]
    rows = [iv.restore(a, heads) for heads in per_layer]
    rows += [iv.transplant(a, heads, "linear") for heads in per_layer]
    moved = runner.run(queries, rows, capture=z_names, **opts)
    singles = [iv.knockout(a, [h]) for h in iv.all_heads(a)]
    knocked = runner.run(queries, singles, **opts)

    n = a.n_layers  # q layer head d: each layer's heads in the row that acts on them
    z_blind = torch.stack([base.captured[name][:, 1] for name in z_names], dim=1)
    z_read = torch.stack([moved.captured[name][:, i] for i, name in enumerate(z_names)], dim=1)
    z_moved = torch.stack([moved.captured[name][:, n + i] for i, name in enumerate(z_names)], 1)
    scales = fitted_scales(z_read - z_blind, z_moved - z_blind)

    gold = np.asarray(gold)
    margin, _ = label_margins(base.logits.numpy(), gold)
    k_margin, _ = label_margins(knocked.logits.numpy(), gold)
    m_icl, m_blind = margin.mean(axis=0)
    ranking, necessity = rank_heads(
        float(m_icl), float(m_blind), k_margin.mean(axis=0).reshape(a.n_layers, a.n_heads)
    )

    vectors = torch.stack([base.captured[n][:, 0].mean(dim=0) for n in resid])
    tv_acc, tv_margin = [], []
    for layer in layers:
        logits = runner.zero_shot(
            queries, replace_last={resid[layer]: vectors[layer]}, keep=label_ids
        )
        m, c = label_margins(logits.numpy(), gold)
        tv_acc.append(float(c.mean()))
        tv_margin.append(float(m.mean()))
    return {
        "scales": scales,
        "ranking": [list(h) for h in ranking],
        "necessity": torch.tensor(necessity, dtype=torch.float32),
        "zero_update_heads": int(((z_moved - z_blind) ** 2).sum(dim=(0, 3)).eq(0).sum()),
        "task_vectors": vectors,
        "tv_layer": choose_layer(np.array(tv_acc), np.array(tv_margin)),
        "tv_accuracy": tv_acc,
        "tv_margin": tv_margin,
        "margins": {"icl": float(m_icl), "blind": float(m_blind)},
        "n_fit": len(queries),
    }
