"""One settings object for a study: what :func:`~icl_lens.compare`, ``icl-lens run`` and
``icl-lens sweep`` share.

Every option of a comparison lives here once, with its check and its help text; the
Python API takes them as keywords (``compare(model, task, shots=8)``) or as a
:class:`StudySettings`, the command line builds its options from the fields
(:mod:`icl_lens.cli.run`), and a sweep's grid file names the same options. A value that
cannot work is refused when the settings are made, before any model or data is touched,
by a :class:`SettingsError` that names the setting.

>>> s = StudySettings(shots=8, ft_mode="both")
>>> s.shots, s.ft_modes, s.lr_values[:2]
(8, ('standard', 'layer_causal'), (0.0001, 0.0002))
>>> StudySettings(shots="4")
Traceback (most recent call last):
...
icl_lens.study.settings.SettingsError: shots must be a whole number >= 1, got '4' (str)
>>> s.replace(seed=2).seed
2
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FT_MODES",
    "LR_SELECTIONS",
    "PROTOCOLS",
    "SettingsError",
    "StudySettings",
]

PROTOCOLS = ("prediction", "dai2023")
FT_MODES = ("standard", "layer_causal")
LR_SELECTIONS = ("queries", "holdout")
"""``queries``: choose the FT learning rate on the measured queries (the authors');
``holdout``: on training examples that are neither demonstrations nor measured."""


class SettingsError(ValueError):
    """A setting that cannot work. ``name``: the setting (a :class:`StudySettings`
    field); ``problem``: what is wrong, phrased to follow the name (``str(err)`` is
    ``f"{name} {problem}"``), so the command line can say ``--shots`` and a grid file
    ``grid.shots`` instead."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def _help(text: str, **cli: Any) -> dict[str, Any]:
    """A field's metadata: its help text and how ``icl-lens run`` spells it (``flag``:
    the option; ``negate``: a ``--no-X`` switch for a true-by-default boolean;
    ``cli_default``: the command line's default where it differs)."""
    return {"help": text, **cli}


@dataclass(frozen=True)
class StudySettings:
    """The options of a comparison of ZSL, ICL and FT (:func:`~icl_lens.compare`).

    Demonstrations: ``shots`` drawn with ``seed`` (shuffle the train split, take the
    first ``shots``, or a class-balanced draw with ``balanced``), re-ordered with
    ``order_seed``. Queries: the first ``max_queries`` validation examples (``None``:
    all the task holds). FT: plain SGD on K/V over ``lr_grid`` (``"paper"``, ``"short"``,
    a number, ``"1e-3,1e-2"`` or a sequence), extended past an edge by at most
    ``lr_extend`` rates, the rate chosen on the measured queries or on ``lr_holdout``
    held-out training examples (``lr_selection``), in one or both ``ft_mode``\\ s.
    ``protocol``: where the recordings are made (docs/method.md). ``kendall_queries``:
    queries used by Kendall and top-k recall. ``retest``: ICL and FT again in another
    order (``retest_seed``), the test-retest ceilings. ``control``: the same
    architecture with untrained weights, ``n_draws`` draws from ``control_seed``.
    ``batch_size``: queries per forward; ``n_resamples``: bootstrap resamples.
    ``interventions``: also the causal tests of :func:`~icl_lens.intervene` (``icl-lens run
    --interventions``), fitted on ``fit_queries`` held-out training examples, with
    ``other_task``'s demonstrations as a control. They do not bind a checkpoint
    directory: adding them to a finished comparison reuses its stages.
    """

    shots: int = field(default=32, metadata=_help("demonstrations k (default 32)"))
    seed: int = field(default=1, metadata=_help("demonstration seed (default 1)"))
    order_seed: int | None = field(
        default=None, metadata=_help("re-order the demonstrations with this seed")
    )
    balanced: bool = field(default=False, metadata=_help("class-balanced demonstrations"))
    max_queries: int | None = field(
        default=None,
        metadata=_help("validation queries measured (default 2000)", cli_default=2000),
    )
    protocol: str = field(
        default="prediction",
        metadata=_help(
            "'prediction' (default): record at the prediction position; 'dai2023': the "
            "authors' code in each point (docs/method.md)",
            choices=PROTOCOLS,
        ),
    )
    ft_mode: str | tuple[str, ...] = field(
        default="standard",
        metadata=_help(
            "FT as the paper (default), Deutch et al.'s layer-causal variant, or both",
            choices=(*FT_MODES, "both"),
        ),
    )
    lr_grid: str | float | tuple[float, ...] = field(
        default="paper",
        metadata=_help("'paper' (36 values), 'short' (4) or e.g. 1e-3,1e-2"),
    )
    lr_extend: int = field(
        default=2,
        metadata=_help(
            "extra learning rates tried past an edge of the grid where the best one sits "
            "(default 2, one decade; 0: none, the run is flagged)"
        ),
    )
    lr_selection: str = field(
        default="queries",
        metadata=_help(
            "choose the FT learning rate on the measured queries (default, as the authors) "
            "or on held-out training examples that are neither demonstrations nor measured",
            choices=LR_SELECTIONS,
        ),
    )
    lr_holdout: int | None = field(
        default=None,
        metadata=_help("size of the held-out lr-selection split (default: as many as the queries)"),
    )
    kendall_queries: int | None = field(
        default=100,
        metadata=_help("queries used by Kendall and top-k recall (default 100, as the authors)"),
    )
    retest: bool = field(
        default=True,
        metadata=_help(
            "skip the test-retest ceilings (ICL and FT again in another order)", negate=True
        ),
    )
    retest_seed: int = field(
        default=0, metadata=_help("seed of the retest's other order (default 0)")
    )
    control: bool = field(
        default=True, metadata=_help("skip the untrained-weights control", negate=True)
    )
    control_seed: int = field(
        default=0, metadata=_help("seed of the control's first random draw (default 0)")
    )
    n_draws: int = field(
        default=3,
        metadata=_help(
            "random draws of the untrained-weights control (default 3)", flag="--control-draws"
        ),
    )
    batch_size: int = field(default=8, metadata=_help("queries per forward (default 8)"))
    n_resamples: int = field(
        default=1000, metadata=_help("bootstrap resamples of every interval (default 1000)")
    )
    interventions: bool = field(
        default=False,
        metadata=_help(
            "also run the causal tests of the dual form (knock out, restore and transplant "
            "each head's meta-gradients; docs/interventions.md)"
        ),
    )
    fit_queries: int = field(
        default=32,
        metadata=_help(
            "held-out training examples (neither demonstrations nor measured) on which the "
            "interventions fit their per-head scales, rank the heads and choose the task "
            "vector's layer (default 32)"
        ),
    )
    other_task: str | None = field(
        default=None,
        metadata=_help(
            "task (paper name or file) whose demonstrations make the interventions' "
            "other-task control (default: a fixed partner of a paper task, another toy "
            "instance; none for a local file)"
        ),
    )

    def __post_init__(self):
        for name in ("shots", "lr_extend", "batch_size", "n_resamples", "n_draws", "fit_queries"):
            _whole(name, getattr(self, name), minimum=0 if name == "lr_extend" else 1)
        for name in ("seed", "retest_seed", "control_seed"):
            _whole(name, getattr(self, name), minimum=0, why=" (it seeds a random generator)")
        for name in ("order_seed",):
            _whole(name, getattr(self, name), minimum=0, optional=True)
        for name in ("max_queries", "lr_holdout", "kendall_queries"):
            _whole(name, getattr(self, name), minimum=1, optional=True)
        if not isinstance(self.balanced, bool):
            raise SettingsError("balanced", f"must be True or False, got {self.balanced!r}")
        for name in ("retest", "control", "interventions"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.other_task is not None and (
            not isinstance(self.other_task, str) or not self.other_task.strip()
        ):
            raise SettingsError(
                "other_task", f"must be a task name or file, or None; got {self.other_task!r}"
            )
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("lr_selection", self.lr_selection, LR_SELECTIONS)
        object.__setattr__(self, "ft_mode", _ft_mode(self.ft_mode))
        if not isinstance(self.lr_grid, str | numbers.Real):
            object.__setattr__(self, "lr_grid", tuple(self.lr_grid))
        self.lr_values  # noqa: B018 - resolving the grid checks it

    @property
    def ft_modes(self) -> tuple[str, ...]:
        """The FT modes to run, in order (``"both"``: standard, then layer-causal)."""
        return self.ft_mode

    @property
    def lr_values(self) -> tuple[float, ...]:
        """The learning-rate grid as numbers."""
        from icl_lens.study.lr_search import lr_grid

        try:
            return lr_grid(self.lr_grid)
        except ValueError:
            raise SettingsError(
                "lr_grid",
                "must be 'paper', 'short' or positive learning rates such as '1e-3,1e-2', "
                f"got {self.lr_grid!r}",
            ) from None

    def replace(self, **changes: Any) -> StudySettings:
        """A copy with ``changes`` (checked like the original)."""
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (tuples as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def of(cls, settings: StudySettings | Mapping[str, Any] | None = None, **changes: Any):
        """``settings`` (or the defaults) with ``changes``: the ``settings, **keywords``
        that the study's functions take.

        >>> StudySettings.of(None, shots=4).shots
        4
        >>> StudySettings.of(StudySettings(shots=4), seed=3).shots
        4
        """
        if settings is None:
            settings = cls()
        elif isinstance(settings, Mapping):
            check_names(settings)
            settings = cls(**settings)
        elif not isinstance(settings, cls):
            raise TypeError(
                f"settings must be a StudySettings (or a dict of its fields), got "
                f"{type(settings).__name__}"
            )
        return settings.replace(**changes) if changes else settings


def check_names(names: Mapping[str, Any] | Sequence[str]) -> None:
    """Refuse names that are not settings, suggesting the nearest one."""
    known = [f.name for f in dataclasses.fields(StudySettings)]
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; settings: {', '.join(known)}"
            raise TypeError(f"{name!r} is not a study setting{hint}")


def _whole(name: str, value: Any, *, minimum: int, optional: bool = False, why: str = "") -> None:
    if value is None and optional:
        return
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    none = " or None" if optional else ""
    if not whole:
        raise SettingsError(
            name,
            f"must be a whole number >= {minimum}{none}, got {value!r} ({type(value).__name__})",
        )
    if value < minimum:
        raise SettingsError(name, f"must be >= {minimum}{why}, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SettingsError(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _ft_mode(spec: Any) -> tuple[str, ...]:
    modes = FT_MODES if spec == "both" else (spec,) if isinstance(spec, str) else tuple(spec)
    if not modes or any(m not in FT_MODES for m in modes):
        raise SettingsError(
            "ft_mode", f"must be one of {', '.join(FT_MODES)}, 'both' or a list; got {spec!r}"
        )
    return tuple(dict.fromkeys(modes))
