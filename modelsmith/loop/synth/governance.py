"""The synthetic set on disk: written by synth jobs, moved into core by a signed acceptance.

``<cluster>/scenarios/synthetic/synth-<job>.jsonl`` holds one job's kept scenarios (set
``synthetic``); ``synth-<job>.provenance.json`` beside it (not a scenario file: the loader reads
only ``.yaml``/``.yml``/``.jsonl``) records for each the teacher engine and model or the
generator, the pattern, the source scenario ids and the generation prompt's hash.

An acceptance writes the scenarios, as set ``core``, to ``core/accepted-<digest12>.jsonl``: first
under a dot-name the loader ignores, then the synthetic files are rewritten without them, then
the core file is renamed into place, so at no moment does an id sit in two sets.

Crash safety: the ledger decides. A synth job's file is written under a dot-name
(``.synth-<job>.jsonl.pending``), its ``synth.finished`` recorded (file and sha256), and only then
renamed into place; an acceptance is recorded (``scenarios.accepted``, with the signature) before
anything moves. :func:`recover` finishes, at the next start, whatever the ledger holds and the
folders do not, and removes what the ledger never heard of.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from modelsmith.atomic import atomic_write_bytes, fsync_dir
from modelsmith.errors import ConflictError, NotFound
from modelsmith.hashing import sha256_hex
from modelsmith.loop.scoring.scenarios import Scenario, parse_scenarios, scenario_hash
from modelsmith.loop.synth.verify import Candidate

__all__ = ["SYNTHETIC", "accept_into_core", "accepted_file", "publish", "read_provenance", "recover",
           "synthetic_files", "write_kept"]

SYNTHETIC: Final = "synthetic"
PROVENANCE_SUFFIX: Final = ".provenance.json"


def _lines(scenarios: Sequence[Scenario]) -> bytes:
    return b"".join(msgspec.json.encode(s, order="sorted") + b"\n" for s in scenarios)


def _pending(final: Path) -> Path:
    return final.with_name(f".{final.name}.pending")


def write_kept(scenarios_dir: Path, job_id: str, kept: Sequence[tuple[Scenario, Candidate]],
               provenance: dict[str, Any]) -> tuple[str, str]:
    """Write one job's kept scenarios (under their pending dot-name: the loader ignores it until
    :func:`publish`) and their provenance; returns (file relative to the cluster's scenarios
    folder, sha256 of its bytes). Blocking."""
    folder = scenarios_dir / SYNTHETIC
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synth-{job_id}.jsonl"
    if path.exists():
        raise ConflictError(f"{path} exists already", data={"file": str(path)})
    records = {
        scenario.id: {"pattern": candidate.pattern, "source_ids": [candidate.source.id],
                      "prompt_sha256": candidate.prompt_sha256, "sha256": scenario_hash(scenario)}
        for scenario, candidate in kept
    }
    sidecar = msgspec.json.encode({**provenance, "job_id": job_id, "scenarios": records},
                                  order="sorted")
    atomic_write_bytes(folder / f"synth-{job_id}{PROVENANCE_SUFFIX}", sidecar)
    data = _lines([s for s, _ in kept])
    atomic_write_bytes(_pending(path), data)
    return path.relative_to(scenarios_dir).as_posix(), sha256_hex(data)


def _rewrite(path: Path, rest: Sequence[Scenario]) -> None:
    if rest:
        atomic_write_bytes(path, _lines(rest))
    else:
        path.unlink()


def publish(scenarios_dir: Path, file: str) -> None:
    """Rename a written synth file into its set (after its ``synth.finished`` is recorded)."""
    final = scenarios_dir / file
    os.replace(_pending(final), final)
    fsync_dir(final.parent)


def synthetic_files(scenarios_dir: Path) -> list[Path]:
    folder = scenarios_dir / SYNTHETIC
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix == ".jsonl")


def read_provenance(scenarios_dir: Path) -> dict[str, dict[str, Any]]:
    """Each synthetic scenario id's provenance (job fields and its own); a missing or broken
    sidecar gives none for its scenarios."""
    out: dict[str, dict[str, Any]] = {}
    for path in synthetic_files(scenarios_dir):
        sidecar = path.with_name(path.stem + PROVENANCE_SUFFIX)
        try:
            record = json.loads(sidecar.read_bytes()[: 8 * 1024 * 1024])
            common = {k: v for k, v in record.items() if k != "scenarios"}
            for scenario_id, own in dict(record.get("scenarios", {})).items():
                out[str(scenario_id)] = {**common, **dict(own)}
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return out


def accepted_file(scenarios_dir: Path, ids: Sequence[str], digest: str,
                  max_prompt_bytes: int | None) -> tuple[str, str]:
    """The core file an acceptance of ``ids`` will write and the sha256 of its bytes (nothing
    is written: the acceptance is recorded with them first)."""
    found, _ = _accepted(scenarios_dir, ids, max_prompt_bytes)
    final = scenarios_dir / "core" / f"accepted-{digest[:12]}.jsonl"
    return final.relative_to(scenarios_dir).as_posix(), sha256_hex(_core_lines(found))


def _core_lines(found: dict[str, Scenario]) -> bytes:
    return _lines([msgspec.structs.replace(found[i], set="core") for i in sorted(found)])


def _accepted(scenarios_dir: Path, ids: Sequence[str], max_prompt_bytes: int | None
              ) -> tuple[dict[str, Scenario], list[tuple[Path, list[Scenario]]]]:
    wanted = set(ids)
    found: dict[str, Scenario] = {}
    rewrites: list[tuple[Path, list[Scenario]]] = []
    for path in synthetic_files(scenarios_dir):
        members = parse_scenarios(path.read_bytes(), filename=str(path), default_set=SYNTHETIC,
                                  max_prompt_bytes=max_prompt_bytes)
        if wanted & {s.id for s in members}:
            found.update({s.id: s for s in members if s.id in wanted})
            rewrites.append((path, [s for s in members if s.id not in wanted]))
    missing = sorted(wanted - set(found))
    if missing:
        raise NotFound(f"no synthetic scenario {missing[0]!r}", data={"scenario": missing[0]})
    return found, rewrites


def accept_into_core(scenarios_dir: Path, ids: Sequence[str], digest: str,
                     max_prompt_bytes: int | None) -> tuple[str, str]:
    """Move the synthetic scenarios ``ids`` into core (see the module docstring); returns
    (core file relative to the scenarios folder, sha256 of its bytes). Blocking; the caller holds
    the cluster's lock, has checked the signature and recorded the acceptance."""
    found, rewrites = _accepted(scenarios_dir, ids, max_prompt_bytes)
    core = scenarios_dir / "core"
    core.mkdir(parents=True, exist_ok=True)
    final = core / f"accepted-{digest[:12]}.jsonl"
    if final.exists():
        raise ConflictError(f"{final} exists already", data={"file": str(final)})
    data = _core_lines(found)
    pending = _pending(final)
    atomic_write_bytes(pending, data)
    for path, rest in rewrites:
        _rewrite(path, rest)
    os.replace(pending, final)
    fsync_dir(core)
    return final.relative_to(scenarios_dir).as_posix(), sha256_hex(data)


def recover(scenarios_dir: Path, finished: dict[str, str],
            accepted: Sequence[tuple[Sequence[str], str, str]],
            max_prompt_bytes: int | None) -> list[str]:
    """Finish what a crash interrupted; returns what was done, one line each. Blocking.

    ``finished``: each ``synth.finished`` file and its sha256; ``accepted``: each
    ``scenarios.accepted`` (ids, file, digest). A pending synth file the ledger names (and whose
    bytes match) is published; one it does not name is removed with its provenance. A recorded
    acceptance whose core file is missing is carried out; a pending core file of no recorded
    acceptance is removed.
    """
    done: list[str] = []
    folder = scenarios_dir / SYNTHETIC
    for pending in sorted(folder.glob(".synth-*.jsonl.pending")) if folder.is_dir() else []:
        final = pending.with_name(pending.name[1:-len(".pending")])
        file = final.relative_to(scenarios_dir).as_posix()
        if file in finished and sha256_hex(pending.read_bytes()) == finished[file]:
            publish(scenarios_dir, file)
            done.append(f"published {file} (its synth.finished is in the ledger)")
        else:
            pending.unlink()
            if not final.exists():
                final.with_name(final.stem + PROVENANCE_SUFFIX).unlink(missing_ok=True)
            done.append(f"removed {pending.name}: no synth.finished records it")
    core = scenarios_dir / "core"
    recorded = {file for _, file, _ in accepted}
    for ids, file, digest in accepted:
        final = scenarios_dir / file
        if final.exists():
            continue
        if _pending(final).exists():  # written; the synthetic files may be rewritten in part
            for path in synthetic_files(scenarios_dir):
                members = parse_scenarios(path.read_bytes(), filename=str(path),
                                          default_set=SYNTHETIC, max_prompt_bytes=max_prompt_bytes)
                rest = [m for m in members if m.id not in set(ids)]
                if len(rest) != len(members):
                    _rewrite(path, rest)
            os.replace(_pending(final), final)
            fsync_dir(final.parent)
        else:
            accept_into_core(scenarios_dir, ids, digest, max_prompt_bytes)
        done.append(f"accepted {len(ids)} scenario(s) into {file} (recorded, not yet moved)")
    for pending in sorted(core.glob(".accepted-*.jsonl.pending")) if core.is_dir() else []:
        final = pending.with_name(pending.name[1:-len(".pending")])
        if final.relative_to(scenarios_dir).as_posix() not in recorded or final.exists():
            pending.unlink()
            done.append(f"removed {pending.name}: no acceptance is waiting for it")
    return done
