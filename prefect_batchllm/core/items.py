"""Work items and results: what goes into a batch and what comes out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

from prefect_batchllm.core.pricing import ModelPrice, price_for
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.core.templates import PromptTemplate, TemplateRef
from prefect_batchllm.core.tokens import TokenUsage, normalize_usage

if TYPE_CHECKING:
    import pandas as pd

# The seed's generics. Defaults (PEP 696) keep shorter subscriptions such as ``WorkItemResult[str]`` valid.
TInput = TypeVar("TInput", default=Any)  # what the item was built from (its prompt / input data)
TOutput = TypeVar("TOutput", default=Any)  # the parsed output
TContext = TypeVar("TContext", default=Any)  # user context carried to the result


@dataclass
class LLMWorkItem(Generic[TInput, TOutput, TContext]):
    """One unit of work: an id, the strategy that knows how to call the LLM, its prompt and context.

    ``LLMWorkItem[TInput, TOutput, TContext]`` as in the seed: ``TInput`` is what the item was built from
    (annotation only), ``TOutput`` the strategy's output type, ``TContext`` the context's type.

    ``prompt`` is a string, or a list of content parts for multimodal strategies. ``template`` (keyword)
    names the versioned prompt template the prompt was made from (a ``TemplateRef`` or ``PromptTemplate``):
    it is recorded in the result's metadata and is part of the item's persisted-result cache key.

    For code written against the original batch-llm, exactly one of the keyword-only ``agent=``
    (a pydantic-ai Agent), ``agent_factory=`` (attempt -> Agent) or ``direct_call=`` (with optional
    ``input_data=``) may be given instead of ``strategy``; it is turned into the matching strategy.
    """

    item_id: str
    strategy: LLMCallStrategy[TOutput] | None = None
    prompt: str | list[Any] = ""
    context: TContext | None = None
    _: KW_ONLY
    template: TemplateRef | None = None
    agent: InitVar[Any] = None
    agent_factory: InitVar[Callable[[int], Any] | None] = None
    direct_call: InitVar[Callable[..., Any] | None] = None
    input_data: InitVar[Any] = None

    def __post_init__(self, agent: Any, agent_factory: Any, direct_call: Any, input_data: Any) -> None:
        if isinstance(self.template, PromptTemplate):
            self.template = self.template.ref
        legacy = {"agent": agent, "agent_factory": agent_factory, "direct_call": direct_call}
        given = [name for name, value in legacy.items() if value is not None]
        if self.strategy is not None:
            given.insert(0, "strategy")
        if len(given) > 1:
            raise TypeError(f"LLMWorkItem {self.item_id!r}: give exactly one of {', '.join(given)}")
        if self.strategy is None and given:
            self.strategy = _legacy_strategy(agent, agent_factory, direct_call, input_data)
            if direct_call is not None and isinstance(self.prompt, str) and not self.prompt.strip():
                self.prompt = input_data if isinstance(input_data, str) and input_data else self.item_id
        self.validate()

    def validate(self) -> None:
        """Check every field; raise a ValueError/TypeError naming the field and the fix."""
        if not isinstance(self.item_id, str) or not self.item_id.strip():
            raise ValueError(f"LLMWorkItem.item_id must be a non-empty string, got {self.item_id!r}")
        if self.strategy is None:
            raise TypeError(f"LLMWorkItem {self.item_id!r}: strategy is None; pass an LLMCallStrategy")
        if not isinstance(self.strategy, LLMCallStrategy):
            raise TypeError(
                f"LLMWorkItem {self.item_id!r}: strategy must be an LLMCallStrategy, "
                f"got {type(self.strategy).__name__}"
            )
        if isinstance(self.prompt, str):
            if not self.prompt.strip():
                raise ValueError(f"LLMWorkItem {self.item_id!r}: prompt is empty; give the text to send")
        elif isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError(f"LLMWorkItem {self.item_id!r}: prompt is an empty list of content parts")
        else:
            raise TypeError(
                f"LLMWorkItem {self.item_id!r}: prompt must be a str or a list of content parts, "
                f"got {type(self.prompt).__name__}"
            )
        if self.template is not None and not isinstance(self.template, TemplateRef):
            raise TypeError(
                f"LLMWorkItem {self.item_id!r}: template must be a TemplateRef or PromptTemplate "
                f"(prefect_batchllm.core.templates), got {type(self.template).__name__}"
            )


#: Builds the strategy behind the seed's ``agent=`` / ``agent_factory=`` / ``direct_call=`` keywords:
#: ``factory(agent, agent_factory, direct_call, input_data)``. The strategies it builds live above ``core``,
#: so :mod:`prefect_batchllm.strategies.seed_keywords` installs it (the package imports that module first).
SeedKeywordFactory = Callable[[Any, Any, Any, Any], "LLMCallStrategy[Any]"]
_seed_keyword_factory: SeedKeywordFactory | None = None


def register_seed_keywords(factory: SeedKeywordFactory) -> None:
    """Install the builder of seed-keyword strategies (called once, by ``strategies.seed_keywords``)."""
    global _seed_keyword_factory
    _seed_keyword_factory = factory


def _legacy_strategy(
    agent: Any, agent_factory: Any, direct_call: Any, input_data: Any
) -> LLMCallStrategy[Any]:
    if _seed_keyword_factory is None:  # only if the package's __init__ was bypassed
        raise RuntimeError("seed keywords need prefect_batchllm.strategies.seed_keywords to be imported")
    return _seed_keyword_factory(agent, agent_factory, direct_call, input_data)


@dataclass
class WorkItemResult(Generic[TOutput, TContext]):
    """Outcome of one item. Failed items carry ``error``, ``error_category`` and ``attempts``.

    ``token_usage`` sums every attempt, failed ones included, because every attempt is billed.
    """

    item_id: str
    success: bool
    output: TOutput | None = None
    error: str | None = None
    context: TContext | None = None
    token_usage: TokenUsage = field(default_factory=lambda: normalize_usage(None))
    gemini_safety_ratings: dict[str, str] | None = None
    error_category: str | None = None
    attempts: int = 0
    duration_s: float = 0.0
    model: str | None = None  # model name used, for cost estimates
    post_processor_error: str | None = None  # recorded, never fails the item
    replayed: bool = False  # loaded from a persisted result of an earlier run, not requested again
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_usage = normalize_usage(self.token_usage)


def _billing(result: WorkItemResult[Any, Any]) -> str:
    return str(result.metadata.get("billing") or "online")


def _cost(result: WorkItemResult[Any, Any], price: ModelPrice) -> float:
    """What ``result``'s tokens cost at ``price`` (batch-billed answers at the batch rate)."""
    u = result.token_usage
    return price.cost(
        u.get("input_tokens", 0),
        u.get("output_tokens", 0),
        u.get("cached_input_tokens", 0),
        billing=_billing(result),
    )


def _template_key(result: WorkItemResult[Any, Any]) -> str | None:
    """``"name@version"`` of the prompt template ``result`` was made from, if it records one."""
    ref = result.metadata.get("prompt_template") if isinstance(result.metadata, dict) else None
    if isinstance(ref, dict) and ref.get("name"):
        return f"{ref['name']}@{ref.get('version')}"
    return None


@dataclass
class BatchTally:
    """Running totals of a batch's results, without keeping the successes: what a streamed table run
    (millions of rows) reduces to. ``failed`` keeps every failed result (compact: no output)."""

    total_items: int = 0
    succeeded: int = 0
    replayed: int = 0
    attempts: int = 0
    billed_batch: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_models: set[str] = field(default_factory=set)
    prompt_templates: dict[str, int] = field(default_factory=dict)
    failed: list[WorkItemResult[Any, Any]] = field(default_factory=list)

    def add(self, result: WorkItemResult[Any, Any]) -> None:
        """Count one result (its output is not kept)."""
        self.total_items += 1
        usage = result.token_usage
        self.input_tokens += usage.get("input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)
        self.cached_tokens += usage.get("cached_input_tokens", 0)
        self.attempts += result.attempts
        self.replayed += result.replayed
        self.billed_batch += _billing(result) == "batch"
        if result.model:
            price = price_for(result.model)
            if price is None:
                self.unpriced_models.add(result.model)
            else:
                self.cost_usd += _cost(result, price)
        key = _template_key(result)
        if key is not None:
            self.prompt_templates[key] = self.prompt_templates.get(key, 0) + 1
        if result.success:
            self.succeeded += 1
        else:
            self.failed.append(result)


@dataclass
class BatchResult(Generic[TOutput, TContext]):
    """All results of a batch, one per input item, in input order, with summary statistics.

    A streamed table run (``summary`` set) keeps only its failed results in ``results``; the statistics
    (counts, tokens, cost, categories, templates) still cover every item.
    """

    results: list[WorkItemResult[TOutput, TContext]]
    total_items: int = 0
    succeeded: int = 0
    failed: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cached_tokens: int = 0
    wall_time_s: float = 0.0
    prices: dict[str, ModelPrice] | None = None  # per-model overrides of the default price table
    #: Gemini batch jobs of an ``execution="batch_api"`` run: name, state, mode, model, counts.
    batch_jobs: list[dict[str, Any]] = field(default_factory=list)
    #: A streamed run's totals; ``results`` then holds only the failed items.
    summary: BatchTally | None = None

    def __post_init__(self) -> None:
        if self.summary is not None:
            t = self.summary
            self.results = list(t.failed)
            self.total_items, self.succeeded, self.failed = t.total_items, t.succeeded, len(t.failed)
            self.total_input_tokens, self.total_output_tokens = t.input_tokens, t.output_tokens
            self.total_cached_tokens = t.cached_tokens
            return
        self.total_items = len(self.results)
        self.succeeded = sum(1 for r in self.results if r.success)
        self.failed = self.total_items - self.succeeded
        self.total_input_tokens = sum(r.token_usage.get("input_tokens", 0) for r in self.results)
        self.total_output_tokens = sum(r.token_usage.get("output_tokens", 0) for r in self.results)
        self.total_cached_tokens = sum(r.token_usage.get("cached_input_tokens", 0) for r in self.results)

    def cache_hit_rate(self) -> float:
        """Percentage (0-100) of input tokens served from the context cache."""
        if not self.total_input_tokens:
            return 0.0
        return 100.0 * self.total_cached_tokens / self.total_input_tokens

    def effective_input_tokens(self) -> int:
        """Input tokens as billed, with cached tokens weighted at a flat 10 % (seed semantics).

        The 10 % is Gemini's usual cached-token discount, applied to every model alike; the per-model cost
        (``estimated_cost_usd``) uses each model's own ``ModelPrice.cached_input`` rate instead.
        """
        uncached = self.total_input_tokens - self.total_cached_tokens
        return round(uncached + 0.10 * self.total_cached_tokens)

    def failed_items(self) -> list[WorkItemResult[TOutput, TContext]]:
        """The failed results, in input order."""
        return [r for r in self.results if not r.success]

    def by_id(self) -> dict[str, WorkItemResult[TOutput, TContext]]:
        return {r.item_id: r for r in self.results}

    @property
    def replayed_count(self) -> int:
        """Items loaded from an earlier run's persisted result."""
        if self.summary is not None:
            return self.summary.replayed
        return sum(1 for r in self.results if r.replayed)

    @property
    def total_attempts(self) -> int:
        """Attempts made in this run (replayed items count 0)."""
        if self.summary is not None:
            return self.summary.attempts
        return sum(r.attempts for r in self.results)

    @property
    def billed_batch_count(self) -> int:
        """Items answered by Gemini batch jobs (billed at batch prices)."""
        if self.summary is not None:
            return self.summary.billed_batch
        return sum(1 for r in self.results if _billing(r) == "batch")

    @property
    def estimated_cost_usd(self) -> float:
        """Estimated spend from each item's model and tokens (0 for models without a known price)."""
        if self.summary is not None:
            return self.summary.cost_usd
        total = 0.0
        for r in self.results:
            price = price_for(r.model, self.prices)
            if price is not None:
                total += _cost(r, price)
        return total

    @property
    def unpriced_models(self) -> list[str]:
        """Models that appear in the results but have no price (their cost counts as 0)."""
        if self.summary is not None:
            return sorted(self.summary.unpriced_models)
        names = {r.model for r in self.results if r.model}
        return sorted(n for n in names if price_for(n, self.prices) is None)

    def prompt_templates(self) -> dict[str, int]:
        """Item counts by prompt template (``"name@version"``), from each result's metadata."""
        if self.summary is not None:
            return dict(self.summary.prompt_templates)
        counts: dict[str, int] = {}
        for r in self.results:
            key = _template_key(r)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        return counts

    def error_categories(self) -> dict[str, int]:
        """Failed-item counts by error category."""
        counts: dict[str, int] = {}
        for r in self.failed_items():
            key = r.error_category or "unknown"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dataframe(self) -> pd.DataFrame:
        """One row per item, in input order (outputs kept as Python objects); a streamed run's failed rows."""
        import pandas as pd

        rows = [
            {
                "item_id": r.item_id,
                "success": r.success,
                "output": r.output,
                "error": r.error,
                "error_category": r.error_category,
                "attempts": r.attempts,
                "duration_s": r.duration_s,
                "input_tokens": r.token_usage.get("input_tokens", 0),
                "output_tokens": r.token_usage.get("output_tokens", 0),
                "cached_tokens": r.token_usage.get("cached_input_tokens", 0),
                "model": r.model,
                "replayed": r.replayed,
            }
            for r in self.results
        ]
        return pd.DataFrame(rows, columns=list(rows[0]) if rows else None)


def check_unique_ids(items: Sequence[LLMWorkItem[Any, Any, Any]]) -> None:
    """Reject duplicate ``item_id``s before anything runs, naming them."""
    seen: set[str] = set()
    dupes: list[str] = []
    for item in items:
        if item.item_id in seen and item.item_id not in dupes:
            dupes.append(item.item_id)
        seen.add(item.item_id)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise ValueError(f"duplicate item_id values: {shown}{more}; every LLMWorkItem needs a unique item_id")
