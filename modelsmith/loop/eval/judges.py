"""The engines that judge: each judge criterion's ``engine`` resolved to an engine held ready.

A judge criterion (``llm_judge``, and any criterion kind with an ``engine`` field) names either
``cluster`` (the cluster's own engine, its base model: no adapter is ever judged by itself) or a
named engine from ``[engines.NAME]`` in modelsmith.toml. Names are checked when the scenario
sets load (an unknown one is refused there, with the known ones); here they are resolved and
held for the length of an eval: a vLLM engine through the pool's gate (awake, not taken by a
trainer), an OpenAI-compatible one waited for within a bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from modelsmith.gpu.engine import Engine
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.loop.scoring.judge_names import JUDGE_CLUSTER_ENGINE
from modelsmith.loop.scoring.scenarios import Scenario

__all__ = ["hold_named", "judge_engine_names", "judge_engines"]


def judge_engine_names(scenarios: Iterable[Scenario]) -> frozenset[str]:
    """Every engine name the judge criteria of ``scenarios`` use."""
    return frozenset(
        name
        for scenario in scenarios
        for criterion in scenario.rubric.criteria
        if isinstance(name := getattr(criterion, "engine", None), str)
    )


async def hold_named(stack: contextlib.AsyncExitStack, engines: EnginePool, named: NamedEngines,
                     name: str, *, ready_s: float) -> Engine:
    """The named engine ``name``, held for ``stack``'s life: a pool engine awake through its
    gate, an OpenAI-compatible server waited for (at most ``ready_s`` or one request's bound;
    then EngineError). UnknownEngine when no such name is configured."""
    engine = named.get(name)
    gate = engines.named_gate(name)
    if gate is not None:
        held: Engine = await stack.enter_async_context(gate.serving(engines.wait_awake_s))
        return held
    timeout = named.request_timeout(name) or ready_s
    await engine.wait_ready(min(ready_s, timeout))
    return engine


@contextlib.asynccontextmanager
async def judge_engines(engines: EnginePool, named: NamedEngines, cluster: str,
                        names: Iterable[str], *, ready_s: float) -> AsyncIterator[dict[str, Engine]]:
    """Each of ``names`` mapped to its engine, all held ready until the block ends.

    ``cluster`` is the cluster's own engine through the pool (it waits while a trainer has the
    GPU, bounded by the pool's ``wait_awake_s``); any other name a named engine.
    """
    async with contextlib.AsyncExitStack() as stack:
        held: dict[str, Engine] = {}
        for name in sorted(set(names)):
            if name == JUDGE_CLUSTER_ENGINE:
                held[name] = await stack.enter_async_context(engines.serving(cluster))
            else:
                held[name] = await hold_named(stack, engines, named, name, ready_s=ready_s)
        yield held
