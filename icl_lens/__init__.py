"""icl-lens: does in-context learning behave like finetuning, head by head?

>>> import icl_lens as il
>>> model = il.toy_model()                                        # doctest: +SKIP
>>> dec = il.decompose(model, il.icl_prompt(model, shots=8))     # doctest: +SKIP
"""

from icl_lens.adapter import ModelAdapter, adapt
from icl_lens.duality import Decomposition, decompose
from icl_lens.loading import load_model
from icl_lens.prefix import PrefixRunner
from icl_lens.prompts import Prompt, build_prompt, task_prompt
from icl_lens.quickstart import icl_prompt, toy_model
from icl_lens.tasks import Example, Task, TaskSpec

__all__ = [
    "Decomposition",
    "Example",
    "ModelAdapter",
    "Prompt",
    "PrefixRunner",
    "Task",
    "TaskSpec",
    "adapt",
    "build_prompt",
    "decompose",
    "icl_prompt",
    "load_model",
    "task_prompt",
    "toy_model",
]
__version__ = "0.1.0"
