"""Classification tasks: a template, one label word per class, and examples.

>>> spec = TaskSpec("sst2", "Sentence: {text} Label:", (" Negative", " Positive"))
>>> ex = Example({"text": "a gripping film"}, label=1)
>>> spec.format_query(ex)
'Sentence: a gripping film Label:'
>>> spec.format_demonstration(ex)
'Sentence: a gripping film Label: Positive'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One labelled example; ``fields`` fill the template's ``{placeholders}``."""

    fields: dict[str, str]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """How a task turns examples into text.

    ``label_words[c]`` is the text that follows the template for class ``c`` (with its
    leading space, as it appears in the prompt). ``separator`` joins demonstrations.
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    separator: str = "\n"

    def format_query(self, example: Example) -> str:
        return self.template.format(**example.fields)

    def format_demonstration(self, example: Example) -> str:
        return self.format_query(example) + self.label_words[example.label]

    @property
    def n_classes(self) -> int:
        return len(self.label_words)


@dataclass
class Task:
    """A task spec with its train (demonstration pool) and validation examples."""

    spec: TaskSpec
    train: list[Example]
    validation: list[Example]
    info: dict = field(default_factory=dict)
