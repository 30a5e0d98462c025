"""One canonical form for every hash: data by value, an explicit opt-out, anything else an explicit error."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import threading

import pytest
from google.genai import types

from prefect_batchllm import LLMWorkItem
from prefect_batchllm.core.identity import FingerprintError, canonical, sha256_of, value_identity
from prefect_batchllm.prefect.tasks import prompt_sha256


class Opaque:
    pass


class Keyed:
    def __init__(self, key: str) -> None:
        self.key = key

    def __batchllm_fingerprint__(self) -> str:
        return self.key


@dataclasses.dataclass
class Row:
    title: str
    tags: frozenset[str]


class Colour(enum.Enum):
    RED = "red"


def test_unknown_values_are_an_error_naming_the_type_and_the_fix() -> None:
    with pytest.raises(FingerprintError, match=r"test_identity\.Opaque.*__batchllm_fingerprint__"):
        canonical({"a": [1, Opaque()]})
    with pytest.raises(FingerprintError):
        canonical(threading.Lock())
    with pytest.raises(TypeError):  # a FingerprintError is a TypeError, as the models' old error was
        sha256_of(Opaque())


def test_the_opt_out_hook_decides_identity() -> None:
    assert value_identity(Keyed("a")) == value_identity(Keyed("a"))
    assert value_identity(Keyed("a")) != value_identity(Keyed("b"))


def test_plain_data_is_hashed_by_value() -> None:
    assert value_identity({"b": 1, "a": 2}) == value_identity({"a": 2, "b": 1})
    assert value_identity(Row("t", frozenset({"x", "y"}))) == value_identity(Row("t", frozenset({"y", "x"})))
    assert value_identity(Row("t", frozenset())) != value_identity(Row("u", frozenset()))
    assert canonical(Colour.RED) == "red"
    assert canonical(b"\x00") == {
        "sha256": "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    }
    part = types.Part.from_text(text="hi")
    assert canonical(part) == canonical(part.model_dump(mode="json", exclude_none=True))


def test_identity_is_the_same_in_another_process() -> None:
    """Sets and dicts are ordered canonically, so string-hash randomisation does not change the hash."""
    code = (
        "from prefect_batchllm.core.identity import value_identity; "
        "print(value_identity({'s': {'x', 'y', 'z'}, 'n': [1, 2.5, None, b'q']}))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {value_identity({"s": {"x", "y", "z"}, "n": [1, 2.5, None, b"q"]})}


def test_prompt_key_refuses_a_part_without_identity_instead_of_hashing_its_repr() -> None:
    assert prompt_sha256(["a", types.Part.from_text(text="b")]) == prompt_sha256(["a", {"text": "b"}])
    with pytest.raises(FingerprintError, match="Opaque"):
        prompt_sha256(["a", Opaque()])
    assert prompt_sha256(["a", Keyed("k")]) == prompt_sha256(["a", Keyed("k")])


def test_seed_direct_call_input_data_without_identity_says_how_to_give_one() -> None:
    def call(data: object, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        return "x", {}

    with pytest.raises(FingerprintError, match=r"Opaque.*DirectCallStrategy\(call, identity="):
        LLMWorkItem(item_id="a", direct_call=call, input_data=Opaque())
    one = LLMWorkItem(item_id="a", direct_call=call, input_data=Keyed("v1"))
    two = LLMWorkItem(item_id="a", direct_call=call, input_data=Keyed("v2"))
    assert one.strategy is not None and two.strategy is not None
    assert one.strategy.fingerprint() != two.strategy.fingerprint()
