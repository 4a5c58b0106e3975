"""What the four comparisons read, recorded per validation query in one setting.

For each query, at one recorded position and for every layer (method.md section 3):

- ``attn_out``: the attention block output (after W_O, before the residual add);
- ``query_scores``: raw pre-softmax scores ``q.k / sqrt(d_head)`` (with the model's own
  scaling, e.g. Gemma's 1/sqrt(query_pre_attn_scalar)) of every head to the query-side
  tokens (the query's tokens up to the position, and BOS under ``"prediction"``;
  demonstration columns left out, so ZSL, ICL and FT rows have the same length; a key
  the model masked, e.g. outside a sliding window, is -inf);
- ``q`` (first ``keep_queries`` queries): the query vector of every head (post-rotary
  where the model rotates), for Kendall's FT side;
- ``demo_scores`` (ICL only, first ``keep_queries`` queries): the scores to each
  demonstration token summed over heads, for Kendall's ICL side;
- the class scores of the restricted prediction, from the same forward.

Two protocols place the recorded position:

- ``"prediction"`` (default): the last prompt token, where the prediction is made.
- ``"dai2023"``: the authors' code appends the first candidate's label word (its first
  token) after the prompt and records there. The prediction still comes from the
  position before it (causal attention: the appended token cannot change it). Its
  SimAM rows leave BOS out as the authors' ``attn_map[:, :, -1, c_len:]`` does, where
  ``c_len`` counts BOS (LMOps ``understand_icl/struprompting/criterions/fs_eval.py``).

The position is the same across ZSL, ICL and FT, so comparisons are consistent.

Scores are recorded as the model's softmax saw them: a token the head cannot see from
the position (on a sliding-window layer, one more than ``window`` tokens back, e.g. the
early demonstrations and BOS of a long ICL prompt on Gemma 3's local layers) scores
``-inf`` and gets no attention. The metrics leave such tokens out (Kendall ranks the
demonstration tokens the layer sees; SimAM compares the tokens all settings see).

>>> import torch, icl_lens as il
>>> from tests.models import make_model
>>> from icl_lens.study.predict import label_tokens
>>> model, _ = make_model("gpt2")
>>> spec = il.TaskSpec("demo", "Sentence: {text} Label:", (" bad", " good"))
>>> queries = [torch.tensor([92, 3, 4, 93]), torch.tensor([92, 5, 93])]
>>> rec = record(model, torch.tensor([1]), queries, label_tokens(model.tokenizer, spec))
>>> rec.attn_out.shape, rec.q.shape, rec.query_scores[0].shape
(torch.Size([2, 2, 32]), torch.Size([2, 2, 4, 8]), torch.Size([2, 4, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_lens.hooks.prefix import PrefixRunner
from icl_lens.model.adapter import adapt
from icl_lens.study.predict import LabelTokens, Predictions, complete_scores, first_token_scores

__all__ = ["PROTOCOLS", "Protocol", "Records", "record"]

Protocol = Literal["prediction", "dai2023"]
PROTOCOLS: tuple[str, ...] = ("prediction", "dai2023")


@dataclass
class Records:
    """Recordings of one setting (ZSL, ICL or FT) on ``n`` validation queries.

    ``positions`` are query-relative (0 = the query's first token). ``prefix_length`` is
    1 for ZSL/FT (BOS) and 1 + the demonstration tokens for ICL. ``dtype``: the one the
    model computed in (the tensors here are float32): it sets the rounding level below
    which two settings' recordings do not differ (:func:`icl_lens.analyses.rounding_level`).
    """

    attn_out: Float[Tensor, "n layer d_model"]
    q: Float[Tensor, "n_kept layer head d_head"]
    query_scores: list[Float[Tensor, "layer head n_query_side"]]
    demo_scores: Float[Tensor, "n_kept layer n_demo"] | None
    class_scores: Float[Tensor, "n n_class"]
    gold: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    prefix_length: int
    protocol: str = "prediction"
    dtype: str = "float32"

    @property
    def predictions(self) -> Predictions:
        return Predictions(self.class_scores, self.gold)

    @property
    def accuracy(self) -> float:
        return self.predictions.accuracy

    def to_dict(self) -> dict:
        """Plain tensors and numbers (for ``torch.save``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Records:
        return cls(**data)


def _query_side(row: Tensor, prefix_length: int, position: int, *, bos: bool = True) -> Tensor:
    """Columns of BOS (if ``bos``) and the query tokens up to ``position`` from a score
    row ``[layer, head, key_pos]`` that covers prefix + query."""
    cols = torch.arange(position + 1) + prefix_length
    if bos:
        cols = torch.cat([torch.zeros(1, dtype=torch.long), cols])
    return row[..., cols]


def record(
    model,
    prefix: Int[Tensor, " prefix"],
    queries: Sequence[Int[Tensor, " query"]],
    labels: LabelTokens,
    *,
    gold: Sequence[int] | None = None,
    protocol: Protocol = "prediction",
    keep_queries: int | None = 100,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "record",
) -> Records:
    """Predict and record every query after the shared ``prefix`` (BOS [+ demonstrations]).

    One forward per batch of queries gives both the prediction and the recordings (plus
    one extra forward per multi-token label word). ``keep_queries`` caps how many of the
    first queries keep their query vectors and demonstration scores (the Kendall inputs;
    the authors use the first 100; ``None``: all).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if not queries:
        raise ValueError("record needs at least one query")
    adapter = adapt(model)
    labels.check(adapter)
    runner = PrefixRunner(adapter, prefix)
    n_prefix = len(prefix)
    appended = torch.tensor([labels.first[0]], dtype=torch.long)
    keep = len(queries) if keep_queries is None else keep_queries

    attn_out, q_vecs, query_scores, demo_scores, first, positions = [], [], [], [], [], []
    layers = range(adapter.n_layers)
    batches = range(0, len(queries), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = [t.long() for t in queries[start : start + batch_size]]
        if protocol == "dai2023":
            run = [torch.cat([t, appended]) for t in chunk]
            pos = [len(t) for t in chunk]
        else:
            run, pos = chunk, [len(t) - 1 for t in chunk]
        out = runner.run(
            run,
            positions=[[p] for p in pos],
            what={"attn_out", "scores", "q"},
            logit_positions=[[len(t) - 1] for t in chunk],  # unembed the prediction only
        )
        last = out.logits[:, 0]
        first.append(first_token_scores(last, labels))
        v = {key: x.float().cpu() for key, x in out.values.items()}
        attn_out.append(torch.stack([v["attn_out", la][:, 0] for la in layers], dim=1))
        q_vecs.append(
            torch.stack([v["q", la][:, 0] for la in layers], dim=1)[: max(0, keep - start)]
        )
        # b l h key; -inf where the model masked, read from its mask in the model's dtype
        scores = torch.stack([v["scores", la][:, 0] for la in layers], dim=1)
        for b, p in enumerate(pos):
            keep_bos = protocol != "dai2023"
            query_scores.append(_query_side(scores[b], n_prefix, p, bos=keep_bos).clone())
            if start + b < keep and n_prefix > 1:
                demo_scores.append(scores[b, :, :, 1:n_prefix].sum(dim=1))
        positions += pos

    class_scores = torch.cat(first)
    if not labels.single_token:
        class_scores = complete_scores(
            runner, list(queries), labels, class_scores, batch_size=batch_size
        )
    gold_t = torch.full((len(queries),), -1) if gold is None else torch.tensor(list(gold))
    return Records(
        attn_out=torch.cat(attn_out),
        q=torch.cat(q_vecs),
        query_scores=query_scores,
        demo_scores=torch.stack(demo_scores) if demo_scores else None,
        class_scores=class_scores,
        gold=gold_t.long(),
        positions=torch.tensor(positions, dtype=torch.long),
        prefix_length=n_prefix,
        protocol=protocol,
        dtype=str(adapter.dtype).removeprefix("torch."),
    )
