"""The seed's item keywords: ``LLMWorkItem(agent=...)``, ``(agent_factory=...)``, ``(direct_call=...)``.

Code written against the original batch-llm builds items from a pydantic-ai agent or a bare callable; this
module turns those keywords into the strategies that implement them (:class:`PydanticAIStrategy`,
:class:`AgentFactoryStrategy`, :class:`DirectCallStrategy`). ``core.items`` cannot import strategies, so this
module registers itself there; ``prefect_batchllm/__init__.py`` imports it, so it is always installed.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any

from prefect_batchllm.core.identity import FingerprintError, callable_identity, value_identity
from prefect_batchllm.core.items import register_seed_keywords
from prefect_batchllm.core.strategy import LLMCallStrategy

__all__ = ["strategy_for_seed_keywords"]


# One strategy per live agent object (agents are not hashable: keyed by id). Weak values: an entry lives
# exactly as long as some item still holds its strategy, and the strategy holds the agent, so the id cannot
# be reused by another object while the entry exists. Nothing accumulates across batches.
_AGENT_STRATEGIES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_AGENT_LOCK = threading.Lock()


def strategy_for_seed_keywords(
    agent: Any, agent_factory: Any, direct_call: Any, input_data: Any
) -> LLMCallStrategy[Any]:
    """The strategy behind the original batch-llm keywords (one per agent, so it is prepared once).

    A ``direct_call`` strategy's identity covers the callable (:func:`callable_identity`: code, defaults,
    closure values) *and* a hash of ``input_data``, which lives only in the wrapper's closure: the item's
    prompt defaults to its id, so without it a changed ``input_data`` would replay the old answer.
    """
    from prefect_batchllm.strategies.direct import DirectCallStrategy, is_coroutine_callable
    from prefect_batchllm.strategies.pydantic_ai import AgentFactoryStrategy, PydanticAIStrategy

    if agent is not None:
        with _AGENT_LOCK:
            strategy = _AGENT_STRATEGIES.get(id(agent))
            if strategy is None or strategy.agent is not agent:
                strategy = _AGENT_STRATEGIES[id(agent)] = PydanticAIStrategy(agent)
            return strategy
    if agent_factory is not None:
        return AgentFactoryStrategy(agent_factory)
    if not callable(direct_call):
        raise TypeError(f"direct_call must be callable, got {type(direct_call).__name__}")
    takes_input = len(inspect.signature(direct_call).parameters) >= 3

    def forward(prompt: Any, attempt: int, timeout: float) -> Any:
        """The seed's signature: ``direct_call([input_data,] attempt, timeout)``; the prompt is not passed."""
        return direct_call(input_data, attempt, timeout) if takes_input else direct_call(attempt, timeout)

    async def forward_async(prompt: Any, attempt: int, timeout: float) -> Any:
        return await forward(prompt, attempt, timeout)

    # Keep the callable's kind, so DirectCallStrategy runs a sync one in a thread (off the loop, under the
    # framework's timeout) and awaits an async one on the loop.
    call = forward_async if is_coroutine_callable(direct_call) else forward
    try:
        data_identity = value_identity(input_data)
    except FingerprintError as exc:
        raise FingerprintError(
            f"LLMWorkItem(direct_call=..., input_data=...): {exc}; or build the strategy yourself with an "
            "explicit key: strategy=DirectCallStrategy(call, identity='...')"
        ) from None
    identity = f"{callable_identity(direct_call)}|input_data={data_identity}"
    return DirectCallStrategy(call, identity=identity)


register_seed_keywords(strategy_for_seed_keywords)
