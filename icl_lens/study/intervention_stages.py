"""The stages of :func:`~icl_lens.intervene` on one demonstration set, each checkpointed
(docs/interventions.md): ``fit`` (held-out queries), ``base`` (ICL, Blind, ZSL, the
all-heads transplants, the task vector; the run-time identities), ``layer-L`` (every
head of layer L and the whole layer), ``curves`` (top-k and random heads) and the
controls (permuted labels, another task, a random update). Each stage's label logits
come with one condition (:func:`~icl_lens.study.intervention_frame.condition`) per
column.
"""

from __future__ import annotations

import numpy as np
import torch

from icl_lens.data.prompts import encode
from icl_lens.hooks import interventions as iv
from icl_lens.hooks.intervention_runner import InterventionRunner
from icl_lens.study.checkpoint import fingerprint_task
from icl_lens.study.intervention_fit import fit_stage
from icl_lens.study.intervention_frame import condition
from icl_lens.study.intervention_inputs import (
    control_prefix,
    fit_examples,
    other_demonstrations,
    other_task_for,
    permutation_without_fixed_label,
    permuted_labels,
    random_updates,
)
from icl_lens.study.pipeline import StudyRun

__all__ = [
    "IDENTITY_TOLERANCE",
    "N_RANDOM_DRAWS",
    "IdentityError",
    "InterventionStages",
    "k_values",
]

IDENTITY_TOLERANCE = 1e-4
"""The run-time identities hold to this, relative to the ICL logits' size (at least 1)."""
N_RANDOM_DRAWS = 3
"""Draws of the random-heads and random-update controls."""
FOUR = (("knockout", ""), ("restore", ""), ("transplant", "linear"), ("transplant", "fitted"))


class IdentityError(RuntimeError):
    """A run-time identity of the interventions failed: their hooks did not act."""


def k_values(total: int) -> list[int]:
    """1, 2, 4, ... below ``total``, then ``total``."""
    ks, k = [], 1
    while k < total:
        ks.append(k)
        k *= 2
    return [*ks, total]


class InterventionStages:
    """One demonstration set's stages (see the module docstring)."""

    def __init__(self, run: StudyRun):
        self.run, self.plan, self.a = run, run.plan, run.adapter
        s = self.plan.settings
        self.s = s
        self.labels = list(self.plan.labels.first)
        self.rows = 8 * s.batch_size
        self.tag = f"interventions-fit{s.fit_queries}-"
        self.runner = InterventionRunner(
            self.a,
            self.plan.prefix,
            demo_mask=self.plan.prompt.demo_mask[: self.plan.prompt.query_start],
        )
        self.flags: list[str] = []
        self.info: dict = {}

    def stage(self, name: str, compute):
        return self.run.stages.get(self.tag + name, compute)

    def measure(self, runner, items, *, full: bool = False) -> dict:
        """Label logits (all logits with ``full``) of every measured query under each
        ``(condition, intervention)``."""
        out = runner.run(
            self.plan.queries,
            [x for _, x in items],
            batch_size=self.rows,
            keep=None if full else self.labels,
            progress=self.run.progress,
        )
        return {"conditions": [c for c, _ in items], "logits": out.logits, "path": out.path}

    # ---- 1. fit ---------------------------------------------------------------------
    def fit(self) -> dict:
        def compute():
            examples = fit_examples(self.plan, self.s.fit_queries)
            spec, tok = self.plan.spec, self.a.model.tokenizer
            queries = [torch.tensor(encode(tok, spec.format_query(e))) for e in examples]
            out = fit_stage(
                self.runner,
                queries,
                [e.label for e in examples],
                self.labels,
                batch_size=self.rows,
                progress=self.run.progress,
            )
            out["texts"] = [spec.format_query(e) for e in examples]
            return out

        return self.stage("fit", compute)

    # ---- 2. base ----------------------------------------------------------------------
    def base(self, fit: dict) -> dict:
        def compute():
            a, scales = self.a, fit["scales"]
            items = [
                (condition("icl"), iv.icl(a)),
                (condition("blind"), iv.blind(a)),
                (condition("restore"), iv.restore(a, "all")),
                (condition("knockout"), iv.knockout(a, "all")),
                (condition("transplant", "linear"), iv.transplant(a, "all", "linear")),
                (
                    condition("transplant", "fitted"),
                    iv.transplant(a, "all", "fitted", scales=scales),
                ),
                (condition("transplant", "softmax"), iv.transplant(a, "all", "softmax")),
            ]
            got = self.measure(self.runner, items, full=True)
            full = got["logits"]
            gaps = _identities(full)
            zsl = self.runner.zero_shot(self.plan.queries)
            info = {
                "identities": gaps,
                "blind_vs_zsl": float((full[:, 1] - zsl).abs().max()),
                "icl_vs_blind": float((full[:, 0] - full[:, 1]).abs().max()),
                "path": got["path"],
            }
            full[:, 2], full[:, 3] = full[:, 0], full[:, 1]  # the same interventions
            conditions, logits = got["conditions"], [full[..., self.labels]]
            conditions.append(condition("zsl"))
            logits.append(zsl[:, None, self.labels])
            if a.line == "bridge":
                same = self.runner.zero_shot(self.plan.queries, same_positions=True)
                info["blind_vs_zsl_same_positions"] = float((full[:, 1] - same).abs().max())
                conditions.append(condition("zsl_same_positions"))
                logits.append(same[:, None, self.labels])
            per_layer = [self.task_vector(fit, layer) for layer in range(a.n_layers)]
            chosen = fit["tv_layer"]  # chosen on the fit queries
            conditions.append(condition("task_vector", layer=chosen))
            logits.append(per_layer[chosen][:, None])
            for layer, tv in enumerate(per_layer):
                conditions.append(condition("task_vector", scope="layer", layer=layer))
                logits.append(tv[:, None])
            return {"conditions": conditions, "logits": torch.cat(logits, dim=1), "info": info}

        return self.stage("base", compute)

    def task_vector(self, fit: dict, layer: int):
        """Label logits of the zero-shot forward with the task vector patched in after
        ``layer`` at the last position."""
        patch = {self.a.name(layer, "resid_post"): fit["task_vectors"][layer]}
        return self.runner.zero_shot(self.plan.queries, replace_last=patch, keep=self.labels)

    # ---- 3. per head and per layer ----------------------------------------------------
    def layer(self, layer: int, scales) -> dict:
        def compute():
            a, items = self.a, []
            for h in range(a.n_heads):
                for name, form in FOUR:
                    c = condition(name, form, scope="head", layer=layer, head=h)
                    items.append((c, _build(a, name, form, [(layer, h)], scales)))
            heads = [(layer, h) for h in range(a.n_heads)]
            for name, form in FOUR:
                c = condition(name, form, scope="layer", layer=layer)
                items.append((c, _build(a, name, form, heads, scales)))
            return self.measure(self.runner, items)

        return self.stage(f"layer-{layer}", compute)

    # ---- 4. curves --------------------------------------------------------------------
    def curves(self, ranking, scales) -> dict:
        def compute():
            a, items = self.a, []
            every = iv.all_heads(a)
            ks = k_values(len(every))
            for k in ks:
                for name, form in FOUR:
                    c = condition(name, form, scope="top_k", k=k)
                    items.append(
                        (c, _build(a, name, form, [tuple(h) for h in ranking[:k]], scales))
                    )
            for draw in range(N_RANDOM_DRAWS):
                rng = np.random.default_rng([self.s.seed, 22, draw])
                for k in ks[:-1]:
                    heads = [every[i] for i in rng.choice(len(every), size=k, replace=False)]
                    for name, form in FOUR:
                        c = condition(
                            name, form, scope="random_k", k=k, control="random_heads", draw=draw
                        )
                        items.append((c, _build(a, name, form, heads, scales)))
            return self.measure(self.runner, items)

        return self.stage("curves", compute)

    # ---- 5. controls ------------------------------------------------------------------
    def prompt_control(self, name: str, demos, spec, scales) -> dict:
        """Restore(all) and Transplant(all, forms) after another prefix."""
        a = self.a
        ctl = control_prefix(a, self.plan, demos, spec)
        runner = InterventionRunner(a, ctl.prefix, demo_mask=ctl.demo_mask)
        items = [
            (condition("restore", control=name), iv.restore(a, "all")),
            *(
                (
                    condition("transplant", form, control=name),
                    _build(a, "transplant", form, "all", scales),
                )
                for form in ("linear", "fitted", "softmax")
            ),
        ]
        out = self.measure(runner, items)
        out["info"] = {"k": len(ctl.demos), "n_dropped": ctl.n_dropped}
        return out

    def permuted(self, scales) -> dict:
        def compute():
            n = self.plan.spec.n_classes
            demos = permuted_labels(self.plan.demos, n, seed=self.s.seed)
            out = self.prompt_control("permuted_labels", demos, None, scales)
            perm = permutation_without_fixed_label(n, seed=self.s.seed)
            out["info"]["permutation"] = perm.tolist()
            out["info"]["labels"] = [d.label for d in demos]
            return out

        return self.stage("permuted", compute)

    def other(self, scales) -> dict | None:
        other, note = other_task_for(self.plan.task, self.s.other_task)
        if other is None:
            self.flags.append(note)
            return None

        def compute():
            demos = other_demonstrations(other, self.plan)
            out = self.prompt_control("other_task", demos, other.spec, scales)
            out["info"]["task"] = other.name
            return out

        return self.stage(f"other-{fingerprint_task(other)[:10]}", compute)

    def random_update(self, scales) -> dict:
        def compute():
            a = self.a
            norms = self.runner.demo_kv(self.plan.queries[0]).update_norms()
            mats = random_updates(norms, a.d_head, seed=self.s.seed, draws=N_RANDOM_DRAWS)
            items = []
            for draw, r in enumerate(mats):
                for form, m in (("linear", r), ("fitted", scales[..., None, None] * r)):
                    c = condition("transplant", form, control="random_update", draw=draw)
                    items.append((c, iv.added_update(a, "all", m, name=f"random update {draw}")))
            out = self.measure(self.runner, items)
            out["info"] = {"norms": norms}
            return out

        return self.stage("random-update", compute)


def _build(a, name: str, form: str, heads, scales) -> iv.Intervention:
    if name == "knockout":
        return iv.knockout(a, heads)
    if name == "restore":
        return iv.restore(a, heads)
    if form == "fitted":
        return iv.transplant(a, heads, "fitted", scales=scales)
    return iv.transplant(a, heads, form)


def _identities(full) -> dict[str, float]:
    """Restore(all) == ICL, Knockout(all) == Blind, Transplant(all, softmax) == ICL on
    the base stage's logits (columns: icl, blind, restore, knockout, ..., softmax);
    raises where one fails."""
    size = max(1.0, float(full[:, 0].abs().max()))
    gaps = {
        "restore(all) == icl": float((full[:, 2] - full[:, 0]).abs().max()),
        "knockout(all) == blind": float((full[:, 3] - full[:, 1]).abs().max()),
        "transplant(all, softmax) == icl": float((full[:, 6] - full[:, 0]).abs().max()),
    }
    for name, gap in gaps.items():
        if not gap <= IDENTITY_TOLERANCE * size:
            raise IdentityError(
                f"run-time identity {name} failed: the logits differ by {gap:.3g} (of "
                f"{size:.3g}); the intervention hooks did not act as they must on this "
                "model, so no intervention result can be trusted (tests/"
                "test_interventions_hooks.py checks them per architecture)"
            )
    return gaps
