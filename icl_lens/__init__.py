"""icl-lens: does in-context learning behave like finetuning, head by head?

>>> import icl_lens as il
>>> model = il.toy_model()                                        # doctest: +SKIP
>>> dec = il.decompose(model, il.icl_prompt(model, shots=8))     # doctest: +SKIP
"""

from icl_lens.data.demonstrations import sample_demonstrations
from icl_lens.data.prompts import Prompt, build_prompt, task_prompt
from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Example, Task, TaskSpec
from icl_lens.hooks.momentum import add_momentum, remove_momentum
from icl_lens.hooks.prefix import PrefixRunner
from icl_lens.model.adapter import ModelAdapter, adapt
from icl_lens.model.loading import load_model
from icl_lens.model.untrained import untrained_copy
from icl_lens.quickstart import icl_prompt, toy_model
from icl_lens.study.compare import compare
from icl_lens.study.comparison import Comparison
from icl_lens.study.duality import Decomposition, decompose
from icl_lens.study.finetune import FinetuneResult, finetune
from icl_lens.study.intervention_result import Interventions, InterventionSet
from icl_lens.study.interventions import intervene, intervene_runs
from icl_lens.study.lr_search import search_lr
from icl_lens.study.predict import Predictions, predict
from icl_lens.study.records import Records, record
from icl_lens.study.runs import ComparisonSet, compare_runs
from icl_lens.study.settings import SettingsError, StudySettings
from icl_lens.views.report import write_report

__all__ = [
    "Comparison",
    "ComparisonSet",
    "Decomposition",
    "Example",
    "FinetuneResult",
    "InterventionSet",
    "Interventions",
    "ModelAdapter",
    "Predictions",
    "PrefixRunner",
    "Prompt",
    "Records",
    "SettingsError",
    "StudySettings",
    "Task",
    "TaskSpec",
    "adapt",
    "add_momentum",
    "build_prompt",
    "compare",
    "compare_runs",
    "decompose",
    "finetune",
    "icl_prompt",
    "intervene",
    "intervene_runs",
    "load_model",
    "load_task",
    "predict",
    "record",
    "remove_momentum",
    "sample_demonstrations",
    "search_lr",
    "task_prompt",
    "toy_model",
    "untrained_copy",
    "write_report",
]
__version__ = "0.1.0"
