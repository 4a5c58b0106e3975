"""icl-lens: does in-context learning behave like finetuning, head by head?"""

from icl_lens.tasks import Example, Task, TaskSpec

__all__ = ["Example", "Task", "TaskSpec"]
__version__ = "0.1.0"
