"""Loading an adapter into a cluster's warm engine, verified by its canaries, recorded.

Every place that makes an engine serve an adapter it did not serve before goes through
:func:`load_verified`: the hot load after training, an approval and a rollback that serve a new
champion, and a daemon restart that loads the champion again. It loads the adapter, replays the
trainer's canaries through it (:func:`modelsmith.gpu.canary.verify_canaries`), and appends
``adapter.checked`` to the ledger with the outcome. A mismatch unloads the adapter again, is
recorded as ``failed`` with the typed error (naming the canary), and is raised: the caller must
not use the adapter. The reducer keeps each adapter's last outcome, so evals and promotion
requests refuse an adapter whose check failed until a later check passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import anyio
import structlog

from modelsmith.errors import ConflictError, ModelsmithError
from modelsmith.gpu.canary import CanaryCheck, verify_canaries
from modelsmith.gpu.engine import Engine
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.records.events import AdapterChecked, failure_of

__all__ = ["CheckContext", "LoadsAdapters", "load_verified", "require_not_failed"]

log = structlog.get_logger("modelsmith.hot_load")

CheckContext = Literal["hot_load", "approval", "rollback", "restart"]


class LoadsAdapters(Protocol):
    """What loading needs of the engine pool (:class:`modelsmith.gpu.engines.EnginePool`)."""

    def engine_for(self, cluster: str) -> Engine: ...

    async def ensure_adapter(self, cluster: str, name: str, path: Path) -> str: ...

    async def unload_adapter(self, cluster: str, name: str) -> None: ...


async def load_verified(runtime: ClusterRuntime, pool: LoadsAdapters, adapter: str, path: Path,
                        context: CheckContext) -> tuple[str, CanaryCheck]:
    """Load ``adapter`` (directory ``path``) into the cluster's engine and check its canaries.

    Returns the engine's adapter name and the check ("verified" or "unverified"); both are
    recorded. Raises EngineError (``reason`` "canary_mismatch") after recording ``failed`` and
    unloading the adapter when the engine does not reproduce the canaries.
    """
    cluster = runtime.cluster.name
    name = await pool.ensure_adapter(cluster, adapter, path)
    try:
        check = await verify_canaries(pool.engine_for(cluster), name, path)
    except ModelsmithError as exc:
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            try:
                await pool.unload_adapter(cluster, adapter)
            except ModelsmithError as unload_error:
                log.warning("could not unload an adapter that failed its canaries",
                            cluster=cluster, adapter=adapter, error=unload_error.message)
            await anyio.to_thread.run_sync(runtime.record, AdapterChecked(
                adapter=adapter, status="failed", context=context,
                reason=str(exc.data.get("reason", exc.name)),
                error=failure_of(exc)))
        log.warning("adapter failed its canaries", cluster=cluster, adapter=adapter,
                    context=context, error=exc.message)
        raise
    await anyio.to_thread.run_sync(runtime.record, AdapterChecked(
        adapter=adapter, status=check.status, context=context, canaries=check.canaries,
        max_logprob_diff=check.max_logprob_diff, tolerance=check.tolerance, reason=check.reason))
    return name, check


def require_not_failed(runtime: ClusterRuntime, adapter: str) -> None:
    """ConflictError when ``adapter``'s last canary check failed (it is not to be used)."""
    if runtime.state.adapter_failed_check(adapter):
        raise ConflictError(
            f"adapter {adapter} of cluster {runtime.cluster.name} failed its canary check after "
            "loading; it is not served (see the ledger's adapter.checked entry)",
            data={"cluster": runtime.cluster.name, "adapter": adapter,
                  "reason": "canary_mismatch"})
