"""The architecture holds (docs/architecture.md): no module imports a higher layer at
module level, and no source file outgrows one job.

Module-level means executed on import: imports inside a function or method body are
left out, which is how a result object offers a view (``Decomposition.plot_heads``,
``Comparison.report``: the view is imported when the method is called, as pandas'
``DataFrame.plot`` does).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"icl_lens": "icl_lens", "hooks": "icl_lens.hooks", "analyses": "icl_lens.analyses"}
MAX_LINES = 600

#: lowest first; a module may import its own layer and the layers below it
LAYERS = (
    ("icl_lens.files", "icl_lens.errors", "icl_lens.analyses"),
    ("icl_lens.model",),
    ("icl_lens.data", "icl_lens.toy"),
    ("icl_lens.hooks",),
    ("icl_lens.study",),
    ("icl_lens.views",),
    ("icl_lens.cli", "icl_lens.bench", "icl_lens.momentum_study", "icl_lens.sweep"),
    ("icl_lens", "icl_lens.quickstart"),  # the package's façade
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module`` or a package above it."""
    best, depth = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = index, name.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the docs")
    return best


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def module_level_imports(module: str, path: Path) -> set[str]:
    """icl_lens modules imported when ``module`` is imported (not inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:  # `from icl_lens import analyses` is a module
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m == "icl_lens" or m.startswith("icl_lens.")}


def test_the_layers_cover_every_module():
    assert len(MODULES) > 40
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    own = layer_of(module)
    higher = sorted(m for m in module_level_imports(module, MODULES[module]) if layer_of(m) > own)
    assert not higher, (
        f"{module} (layer {own}: {LAYERS[own]}) imports {higher} from a higher layer at "
        "module level; move the code down, or import inside the method that needs it "
        "(docs/architecture.md)"
    )


def test_the_check_catches_an_upward_import(tmp_path):
    """Negative control: a study module importing a view at module level is caught,
    the same import inside a method is not."""
    path = tmp_path / "probe.py"
    path.write_text(
        "from icl_lens.views.report import write_report\n"
        "class A:\n    def plot(self):\n        from icl_lens.cli import main\n"
    )
    found = module_level_imports("icl_lens.study.probe", path)
    assert found == {"icl_lens.views.report"}
    assert layer_of("icl_lens.views.report") > layer_of("icl_lens.study.probe")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_source_file_is_over_the_size_limit(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (
        f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): "
        "split it by job"
    )
