"""The layer rule (README, Layout), checked from the code: ``core`` is the bottom, imports nothing above."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import prefect_batchllm

PACKAGE = Path(prefect_batchllm.__file__).parent
ABOVE_CORE = ("strategies", "models", "prefect", "testing", "dataframe", "tables", "cli")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` / ``from ... import`` names in ``path`` (function-level ones included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_core_imports_nothing_from_strategies_models_or_prefect() -> None:
    offending = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for line, module in _imported_modules(path):
            top = module.split(".")
            above = top[0] == "prefect_batchllm" and len(top) > 1 and top[1] in ABOVE_CORE
            if above or top[0] == "prefect" or module.startswith(".."):
                offending.append(f"{path.name}:{line} imports {module}")
    assert offending == []


def test_importing_core_loads_no_model_strategy_or_prefect_module() -> None:
    """At run time too: the package face installs only ``strategies.seed_keywords`` (which imports core)."""
    code = (
        "import sys; import prefect_batchllm.core.attempt, prefect_batchllm.core.items, "
        "prefect_batchllm.core.identity, prefect_batchllm.core.strategy; "
        "above = ('prefect_batchllm.models', 'prefect_batchllm.prefect', 'prefect_batchllm.strategies.'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect' or m.startswith(above)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['prefect_batchllm.strategies.seed_keywords']"


def test_reading_and_writing_a_table_does_not_import_prefect(tmp_path: Path) -> None:
    code = (
        "import sys, pandas as pd; from prefect_batchllm import read_table, write_table; "
        f"write_table(pd.DataFrame({{'a': [1, 2]}}), {str(tmp_path / 't.parquet')!r}); "
        f"assert read_table({str(tmp_path / 't.parquet')!r})['a'].tolist() == [1, 2]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect' or '.prefect' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
