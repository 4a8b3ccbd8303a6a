"""Import direction (style rules 1, 2, 12), read from the source trees' ASTs without importing them."""
import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# first-party top-level packages each tree may import, besides the standard library and, for
# kernels, torch/triton only (kernels do not know transformers, the pipeline or the stages)
ALLOWED = {
    "kernels": {"kernels", "torch", "triton"},
    "stages": {"pipeline"},
}


def imported_tops(path: Path) -> set[str]:
    """Top-level package of every absolute import in `path`, relative ones resolved to its own tree."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            tops.add(path.relative_to(REPO).parts[0] if node.level else node.module.split(".")[0])
    return tops


def sources(tree: str) -> list[Path]:
    return sorted((REPO / tree).rglob("*.py"))


@pytest.mark.parametrize("tree", sorted(ALLOWED))
def test_tree_imports_only_what_it_may(tree):
    for path in sources(tree):
        extra = imported_tops(path) - ALLOWED[tree] - set(sys.stdlib_module_names)
        assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)}"


@pytest.mark.parametrize("tree", ["pipeline", "tests"])
def test_nothing_imports_stages_and_pipeline_not_upwards(tree):
    for path in sources(tree):
        assert "stages" not in imported_tops(path), f"{path.relative_to(REPO)} imports stages"


def test_only_tracking_imports_mlflow():
    importers = [path.relative_to(REPO).as_posix() for tree in ("kernels", "pipeline", "stages", "tests")
                 for path in sources(tree) if "mlflow" in imported_tops(path)]
    assert importers == ["pipeline/tracking.py"]
