"""The typed public face: what ``import prefect_batchllm`` offers, to users and to type checkers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

import prefect_batchllm

PACKAGE = Path(prefect_batchllm.__file__).parent
LAZY_FACES = [
    "prefect_batchllm",
    "prefect_batchllm.models",
    "prefect_batchllm.strategies",
    "prefect_batchllm.prefect",
]


def _exports_and_type_checking_names(module: str) -> tuple[dict[str, str], dict[str, str]]:
    path = Path(importlib.import_module(module).__file__ or "")
    tree = ast.parse(path.read_text())
    exports: dict[str, str] = {}
    seen: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_EXPORTS":
            exports = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name}: re-export as `X as X`"
                    seen[alias.name] = imp.module
    return exports, seen


@pytest.mark.parametrize("module", LAZY_FACES)
def test_type_checkers_see_exactly_the_lazy_exports(module: str) -> None:
    exports, seen = _exports_and_type_checking_names(module)
    assert exports and seen == exports


@pytest.mark.parametrize("module", LAZY_FACES)
def test_every_lazy_export_resolves(module: str) -> None:
    face = importlib.import_module(module)
    for name in face.__all__:
        assert getattr(face, name) is not None


def test_what_users_catch_or_use_is_exported() -> None:
    from prefect_batchllm import EnrichmentFailed, GlobalRateLimiter, RateLimitConfigurationError
    from prefect_batchllm.dataframe import EnrichmentFailed as frame_error
    from prefect_batchllm.prefect import limits

    assert EnrichmentFailed is frame_error
    assert (GlobalRateLimiter, RateLimitConfigurationError) == (
        limits.GlobalRateLimiter,
        limits.RateLimitConfigurationError,
    )
    assert not [n for n in prefect_batchllm.__all__ if n.startswith("_")]


def test_the_seed_generics_subscript_as_documented() -> None:
    from prefect_batchllm import BatchResult, LLMWorkItem, Middleware, ParallelBatchProcessor, WorkItemResult

    assert LLMWorkItem[str, int, dict[str, Any]].__origin__ is LLMWorkItem  # type: ignore[attr-defined]
    assert Middleware[str, int, None].__origin__ is Middleware  # type: ignore[attr-defined]
    assert WorkItemResult[int, None] is not None and BatchResult[int, None] is not None
    assert ParallelBatchProcessor[str, int, None].__origin__ is ParallelBatchProcessor  # type: ignore[attr-defined]

    class Upper(Middleware[str, str, None]):
        async def after_process(self, result: Any) -> Any:
            return result

    assert isinstance(Upper(), Middleware)


def test_the_package_is_marked_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_seed_enable_detailed_logging_is_accepted_and_says_it_does_nothing() -> None:
    import warnings

    from prefect_batchllm import ProcessorConfig

    with pytest.warns(DeprecationWarning, match="enable_detailed_logging has no effect") as caught:
        config = ProcessorConfig(enable_detailed_logging=True)
    assert config.enable_detailed_logging is True
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProcessorConfig()


def test_the_installed_cli_runs_the_packaged_demo_not_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``prefect-batchllm demo`` works from any directory: the demo and its data ship in the package."""
    import os
    import sys

    from prefect_batchllm import cli, demo

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the CLI's quiet settings must not leak
    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "main", lambda argv: calls.append(list(argv)) or 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != PACKAGE.parent])
    monkeypatch.delitem(sys.modules, "flows", raising=False)
    assert cli.main(["demo", "7"]) == 0 and calls == [["7"]]
    assert "flows" not in sys.modules
    assert len(demo.load_books(3)) == 3 and (demo.DATA / "cataloguing_guide.md").is_file()
