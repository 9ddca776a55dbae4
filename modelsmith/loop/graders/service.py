"""``scenarios.import_graders``: convert, check with the scenario loader, write, record.

The conversion (:mod:`modelsmith.loop.graders.openai_import`) yields scenario dicts; they are
encoded as one JSONL scenario file and read back through the very loader the daemon uses
(:func:`~modelsmith.loop.scoring.scenarios.parse_scenarios`, with the cluster's prompt bound and
known judge engines), so a file that is written is a file that loads. Nothing is written when
a scenario id or the file name is taken. The grader JSON is written first, verbatim
(``<name>.graders.json``: the loader reads only ``.yaml``/``.yml``/``.jsonl``), then the scenario
file, each atomically and exclusively (never over an existing file); the set's new version is
then a ``scenarios.changed`` ledger entry.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec

from modelsmith.atomic import create_exclusive
from modelsmith.errors import ConflictError, ModelsmithError
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.graders.openai_import import ImportOptions, convert
from modelsmith.loop.scoring.scenarios import parse_scenarios, prompt_byte_limit
from modelsmith.rpc.context import CallContext
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.graders import GraderMapping, ImportGradersParams, ImportGradersResult

__all__ = ["PROVENANCE_SUFFIX", "import_graders", "register_grader_methods"]

PROVENANCE_SUFFIX = ".graders.json"


def import_graders(runtime: ClusterRuntime, params: ImportGradersParams) -> ImportGradersResult:
    """Blocking: the whole import of ``params`` into ``runtime``'s cluster."""
    runtime.require_ledger()
    options = ImportOptions(
        name=params.name, set=params.set, judge_engine=params.judge_engine,
        prompt=params.prompt, reference=params.reference, domain=params.domain,
        pass_mark=params.pass_mark,
    )
    conversion = convert(params.graders, params.items, options)
    folder = runtime.cluster.scenarios_dir / params.set
    scenario_file = folder / f"{params.name}.jsonl"
    provenance = folder / f"{params.name}{PROVENANCE_SUFFIX}"
    data = b"".join(msgspec.json.encode(s) + b"\n" for s in conversion.scenarios)
    scenarios = parse_scenarios(
        data, filename=str(scenario_file), default_set=params.set,
        max_prompt_bytes=prompt_byte_limit(runtime.cluster.config.model.max_model_len),
        judge_engines=runtime.judge_engines,
    )
    mapping = [GraderMapping(grader=m.grader, type=m.type, criterion=m.criterion, note=m.note)
               for m in conversion.mapping]
    for path in (scenario_file, provenance):
        if path.exists():
            raise ConflictError(f"{path} exists: import under another --name, or remove it",
                                data={"file": str(path)})
    # A cluster with no scenarios folder yet has no ids to collide with.
    existing = runtime.read_catalog() if runtime.cluster.scenarios_dir.is_dir() else None
    taken = sorted(s.id for s in scenarios if existing is not None and existing.get(s.id))
    if taken:
        raise ConflictError(f"scenario id(s) already in cluster {runtime.cluster.name}: "
                            + ", ".join(taken[:5]), data={"ids": taken[:20]})
    result = ImportGradersResult(cluster=runtime.cluster.name, set=params.set, name=params.name,
                                 scenarios=len(scenarios), dry_run=params.dry_run, mapping=mapping)
    if params.dry_run:
        return result
    folder.mkdir(parents=True, exist_ok=True)
    # Exclusive creation: two imports racing for one name cannot overwrite each other.
    try:
        create_exclusive(provenance, params.graders.encode("utf-8"))
    except FileExistsError:
        raise ConflictError(f"{provenance} exists", data={"file": str(provenance)}) from None
    try:
        create_exclusive(scenario_file, data)
    except FileExistsError:
        _remove(provenance)
        raise ConflictError(f"{scenario_file} exists", data={"file": str(scenario_file)}) from None
    try:
        runtime.read_catalog()
    except ModelsmithError:
        _remove(scenario_file, provenance)  # the set as a whole must still load
        raise
    changed = runtime.reload_scenarios()
    catalog = runtime.require_catalog()
    version = catalog.sets[params.set].version if params.set in catalog.sets else None
    result.files = [str(scenario_file), str(provenance)]
    result.version, result.changed = version, changed
    return result


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def register_grader_methods(table: MethodTable, fleet: Fleet) -> None:
    async def scenarios_import_graders(params: ImportGradersParams, ctx: CallContext
                                       ) -> ImportGradersResult:
        runtime = fleet.get(params.cluster)
        return await anyio.to_thread.run_sync(import_graders, runtime, params)

    table.add("scenarios.import_graders", ImportGradersParams, scenarios_import_graders,
              "Import OpenAI grader JSON and its items as a governed scenario file.")
