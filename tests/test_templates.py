"""Versioned prompt templates from files: the format, directories (local and fsspec), and the contract that
a new template version re-runs the rows while the same version replays them (requests counted at the server).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from pydantic import SecretStr

from prefect_batchllm import LLMWorkItem
from prefect_batchllm.core.templates import (
    PromptTemplate,
    TemplateRef,
    load_prompt_template,
    load_prompt_templates,
    parse_prompt_template,
)
from prefect_batchllm.prefect.tasks import item_cache_key
from prefect_batchllm.strategies.direct import DirectCallStrategy
from prefect_batchllm.tables import write_table
from prefect_batchllm.testing import GeminiEmulator

BODY = "[{book_id}] Catalogue {title} ({year}): genre and a one-line summary."


def _template_file(name: str, version: str | int, body: str = BODY) -> str:
    return f"---\nname: {name}\nversion: {version}\ndescription: test template  # a comment\n---\n\n{body}\n"


# -- format and loading (no Prefect) ---------------------------------------------------------------------


def test_front_matter_and_plain_files(tmp_path: Path) -> None:
    parsed = parse_prompt_template(_template_file("catalogue", "2026-11-30"), source="x.md")
    assert (parsed.name, parsed.version, parsed.text) == ("catalogue", "2026-11-30", BODY)
    assert parsed.description == "test template" and parsed.ref == TemplateRef("catalogue", "2026-11-30")
    assert parsed.format(book_id="b", title="T", year=1900).startswith("[b] Catalogue T (1900)")

    plain = tmp_path / "summary.txt"
    plain.write_text("Summarise {title}.\n")
    loaded = load_prompt_template(plain)
    assert (
        loaded.name == "summary" and loaded.version.startswith("sha-") and loaded.text == "Summarise {title}."
    )
    plain.write_text("Summarise {title} briefly.\n")
    assert load_prompt_template(plain).version != loaded.version  # any edit is a new version

    with pytest.raises(ValueError, match="closing '---'"):
        parse_prompt_template("---\nname: a\nSummarise {title}")
    with pytest.raises(ValueError, match="line 2: expected 'key: value'"):
        parse_prompt_template("---\nno colon here\n---\nbody")
    with pytest.raises(ValueError, match="text is empty"):
        parse_prompt_template("---\nname: a\nversion: 1\n---\n   \n")
    with pytest.raises(ValueError, match="name must be"):
        parse_prompt_template("---\nname: has space\nversion: 1\n---\nbody")


@pytest.mark.parametrize("root", ["local", "memory"])
def test_directories_pick_by_name_and_highest_version(tmp_path: Path, root: str) -> None:
    base = str(tmp_path / "templates") if root == "local" else f"memory://templates-{uuid.uuid4().hex[:8]}"
    fs, path = fsspec.core.url_to_fs(base)
    fs.makedirs(path, exist_ok=True)
    for file, content in {
        "catalogue.v2.md": _template_file("catalogue", 2),
        "catalogue.v10.md": _template_file("catalogue", 10, "v10 {title}"),
        "catalogue.v9.md": _template_file("catalogue", 9),
        "summary.prompt": "Summarise {title}.",
        "README.rst": "not a template",
        ".hidden.md": "ignored",
    }.items():
        with fs.open(f"{path}/{file}", "w") as handle:
            handle.write(content)

    names = [(t.name, t.version) for t in load_prompt_templates(base)]
    assert (
        names[:3] == [("catalogue", "2"), ("catalogue", "9"), ("catalogue", "10")]
        and names[3][0] == "summary"
    )
    with pytest.raises(ValueError, match="pass name= to pick one"):
        load_prompt_template(base)
    latest = load_prompt_template(base, name="catalogue")
    assert latest.version == "10" and latest.text == "v10 {title}"  # natural order: 10 after 9
    assert load_prompt_template(base, name="catalogue", version=9).version == "9"
    with pytest.raises(ValueError, match=r"no version '3'; versions: \['2', '9', '10'\]"):
        load_prompt_template(base, name="catalogue", version="3")
    with pytest.raises(ValueError, match="no prompt template named 'nope'"):
        load_prompt_template(base, name="nope")
    with fs.open(f"{path}/copy.md", "w") as handle:
        handle.write(_template_file("catalogue", 9))
    with pytest.raises(ValueError, match="defined twice"):
        load_prompt_templates(base)
    with pytest.raises(FileNotFoundError):
        load_prompt_template(f"{base}/missing")


def test_the_template_version_is_part_of_the_cache_key() -> None:
    strategy = DirectCallStrategy(lambda prompt, attempt, timeout: prompt)
    v1 = parse_prompt_template(_template_file("catalogue", 1))
    v2 = parse_prompt_template(_template_file("catalogue", 2))
    plain = LLMWorkItem(item_id="a", strategy=strategy, prompt="p")
    one = LLMWorkItem(item_id="a", strategy=strategy, prompt="p", template=v1)
    assert one.template == TemplateRef("catalogue", "1")  # a PromptTemplate is stored as its ref
    assert item_cache_key(one) == item_cache_key(
        LLMWorkItem(item_id="a", strategy=strategy, prompt="p", template=v1)
    )
    assert item_cache_key(one) != item_cache_key(
        LLMWorkItem(item_id="a", strategy=strategy, prompt="p", template=v2)
    )
    assert item_cache_key(one) != item_cache_key(plain)
    with pytest.raises(TypeError, match="template must be a TemplateRef or PromptTemplate"):
        LLMWorkItem(item_id="a", strategy=strategy, prompt="p", template="catalogue@1")  # type: ignore[arg-type]


# -- end to end: enrich-table with a template path, real Prefect API and the bundled Gemini server -------


BLOCK = "templates-test-model"


@pytest.fixture
def model_block(prefect_api: str, emulator: GeminiEmulator) -> str:
    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock, GeminiCredentials

    GeminiCachedModelBlock(
        model="gemini-2.5-flash",
        credentials=GeminiCredentials(
            api_key=SecretStr("test-key"), base_url=emulator.base_url, api_version="v1beta"
        ),
        system_instruction="You catalogue books.",
    ).save(BLOCK, overwrite=True)
    return BLOCK


def _books(tag: str, n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "book_id": [f"{tag}-{i}" for i in range(n)],
            "title": [f"Title {i}" for i in range(n)] if n else [],
            "year": [1800 + i for i in range(n)],
        }
    )


async def _latest_summary(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(found[0].data)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_template_version_bump_reruns_exactly_the_rows(
    model_block: str, emulator: GeminiEmulator, tmp_path: Path, chunk_size: int | None
) -> None:
    from flows.enrich_table import enrich_table
    from prefect_batchllm.dataframe import enrich_frame

    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i}" for i in range(6)]
    write_table(_books(tag), tmp_path / "books.parquet")
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "catalogue.v1.md").write_text(_template_file("catalogue", 1))
    artifact = f"templates-{tag}"

    def run(**extra: Any) -> dict[str, Any]:
        return enrich_table(
            input_path=str(tmp_path / "books.parquet"),
            output_path=str(tmp_path / "out.parquet"),
            prompt_template_path=str(templates),
            model_block=model_block,
            id_column="book_id",
            chunk_size=chunk_size,
            **extra,
        )

    def requests() -> dict[str, int]:
        return {i: emulator.count("generateContent", contains=f"[{i}]") for i in ids}

    first = run()
    assert requests() == dict.fromkeys(ids, 1)
    assert first["prompt_template"] == {"name": "catalogue", "version": "1"} and first["replayed"] == 0

    again = run()  # same version: every row replays, nothing is requested
    assert requests() == dict.fromkeys(ids, 1) and again["replayed"] == 6

    # Version 2 with the very same text: each row is requested exactly once more.
    (templates / "catalogue.v2.md").write_text(_template_file("catalogue", 2))
    bumped = run()
    assert requests() == dict.fromkeys(ids, 2)
    assert bumped["prompt_template"] == {"name": "catalogue", "version": "2"} and bumped["replayed"] == 0
    pinned = run(prompt_template_version="1")  # the old version is still cached
    assert requests() == dict.fromkeys(ids, 2) and pinned["replayed"] == 6

    # Every result's metadata names the template, replayed or not, and so does the summary artifact.
    from prefect_batchllm import ProcessorConfig

    template = load_prompt_template(templates, version="2")
    df = _books(tag)
    df.loc[2, "title"] = None  # never sent: it records the template too
    frame, batch = enrich_frame(
        df,
        template,
        id_column="book_id",
        model_block=model_block,
        config=ProcessorConfig(persist_results=True, chunk_size=chunk_size, artifact_key=artifact),
    )
    assert requests() == dict.fromkeys(ids, 2) and int(frame["replayed"].sum()) == 5
    assert batch is not None and all(
        r.metadata["prompt_template"] == {"name": "catalogue", "version": "2"} for r in batch.results
    )
    assert batch.prompt_templates() == {"catalogue@2": 5}
    assert frame.attrs["batchllm"]["prompt_template"] == {"name": "catalogue", "version": "2"}
    import asyncio

    summary = asyncio.run(_latest_summary(f"{artifact}-summary"))
    assert "| prompt template | catalogue@2 (5 items) |" in summary


def test_enrich_dataframe_accepts_a_template_object_or_path(
    model_block: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """``enrich_dataframe`` (the flow) takes a PromptTemplate or a ``Path`` to a template file."""
    from prefect_batchllm import ProcessorConfig, enrich_dataframe

    tag = uuid.uuid4().hex[:8]
    template = PromptTemplate(name="catalogue", version="7", text=BODY)
    frame = enrich_dataframe(
        _books(tag, 3), template, model_block=model_block, id_column="book_id", config=ProcessorConfig()
    )
    assert frame["success"].all() and frame.attrs["batchllm"]["prompt_template"]["version"] == "7"
    assert emulator.count("generateContent") == 3

    path = tmp_path / "catalogue.md"
    path.write_text(_template_file("catalogue", 8))
    frame = enrich_dataframe(
        _books(tag, 3), path, model_block=model_block, id_column="book_id", config=ProcessorConfig()
    )
    assert frame.attrs["batchllm"]["prompt_template"] == {"name": "catalogue", "version": "8"}
    assert emulator.count("generateContent") == 6  # a new version: requested again
