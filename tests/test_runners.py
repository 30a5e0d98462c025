"""``task_runner_from``: one string (a deployment parameter) to Prefect's Dask / Ray task runner."""

from __future__ import annotations

import sys

import pytest

from prefect_batchllm.prefect.runners import task_runner_from


@pytest.mark.parametrize("spec", [None, "", "  ", "default", "local"])
def test_default_means_the_flows_own_runner(spec: str | None) -> None:
    assert task_runner_from(spec) is None


def test_dask_forms() -> None:
    from prefect_dask import DaskTaskRunner

    local = task_runner_from("dask")
    assert isinstance(local, DaskTaskRunner) and local.address is None
    sized = task_runner_from("dask?n_workers=2&threads_per_worker=1&processes=true")
    assert isinstance(sized, DaskTaskRunner)
    assert sized.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    remote = task_runner_from("dask://scheduler.internal:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler.internal:8786"
    assert task_runner_from("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"  # type: ignore[union-attr]
    assert task_runner_from(" DASK ") is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("spark", "unknown task_runner 'spark'"),
        ("http://host:8786", "unknown task_runner scheme 'http'"),
        ("dask://", "give a scheduler address"),
        ("dask://host", "give the scheduler's port"),
        ("dask://host:port", "the port must be a number"),
        ("dask://host:8786/path", "give a scheduler address"),
        ("dask://host:8786?n_workers=2", "apply only to a local cluster"),
        ("dask?n_workers", "cannot read the options"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        task_runner_from(spec)
    with pytest.raises(ValueError, match=r"must be a string"):
        task_runner_from(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "extra", "module"), [("dask", "dask", "prefect_dask"), ("ray://h:1", "ray", "prefect_ray")]
)
def test_a_missing_extra_names_the_install(
    spec: str, extra: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    with pytest.raises(ValueError, match=rf"pip install 'prefect-batchllm\[{extra}\]'"):
        task_runner_from(spec)


def test_ray_forms() -> None:
    prefect_ray = pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (the [ray] extra)")
    local = task_runner_from("ray?num_cpus=2")
    assert isinstance(local, prefect_ray.RayTaskRunner) and local.init_kwargs["num_cpus"] == 2
    remote = task_runner_from("ray://head.internal:10001")
    assert isinstance(remote, prefect_ray.RayTaskRunner) and remote.address == "ray://head.internal:10001"
