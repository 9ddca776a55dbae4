"""Evidence bundles: what a reviewer reads before signing a promotion, and can check offline.

:func:`build_bundle` writes ``<cluster>/bundles/<request_id>/``::

    index.html                      one self-contained page (inline CSS, inline SVG charts)
    record/promotion-request.json   the daemon-signed request, byte for byte
    record/decision.json            the signed decision with reviewers' SSH signatures (if any)
    evals/candidate-summary.json    the candidate's eval summary
    evals/baseline-summary.json     the champion's eval (or the eval's own baseline)
    analysis/diff.json              scenario by scenario: fixed, regressed, unchanged; the fixed
                                    and regressed ones with prompt, both responses, reference and
                                    criterion breakdowns
    analysis/comparison.json        eval.compare of baseline vs candidate (deltas, paired test,
                                    format and substance deltas where the eval carries them)
    analysis/failure-patterns.json  failed criteria of the candidate grouped by type + error kind
    analysis/training-curve.json    reward and KL by step, from the trainer's metric log
    analysis/composite-by-iteration.json  from the ledger's eval.finished entries
    charts/*.svg                    the charts, as embedded in index.html
    training/training_manifest.json the trainer's manifest, byte for byte
    training/leakage-proof.json     the manifest's check, re-done against today's held-out set
    training/run.json               hyperparameters (the trainer's spec.json), stop reason and
                                    steps (the ledger's iteration.advanced), base model identity
    MANIFEST                        ``sha256  path`` for every file above (``sha256sum -c``)
    MANIFEST.sig                    the daemon's Ed25519 signature over MANIFEST
    bundle.tar.gz                   all of the above under ``<request_id>/``

:func:`verify_bundle` checks a bundle directory or tarball offline. Building is blocking
(matplotlib, tar): the daemon runs it in a worker thread.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelsmith.atomic import atomic_write_bytes, fsync_dir
from modelsmith.errors import ModelsmithError, NotFound
from modelsmith.hashing import sha256_hex
from modelsmith.loop.records.events import (
    EvalFinished,
    IterationAdvanced,
    PromotionApproved,
    PromotionRejected,
    PromotionRequested,
    TrainStarted,
)

if TYPE_CHECKING:
    from modelsmith.loop.cluster.config import Cluster
    from modelsmith.loop.records.events import LedgerEvent
    from modelsmith.loop.records.ledger import Recorded
    from modelsmith.loop.records.signing import DaemonKey

__all__ = ["MANIFEST", "MANIFEST_SIG", "TARBALL", "BuiltBundle", "build_bundle", "verify_bundle"]

MANIFEST = "MANIFEST"
MANIFEST_SIG = "MANIFEST.sig"
TARBALL = "bundle.tar.gz"
_MAX_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class BuiltBundle:
    directory: Path
    html: Path
    tarball: Path
    tarball_sha256: str
    files: int


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def _read_json(path: Path) -> tuple[bytes, Any] | None:
    try:
        raw = path.read_bytes()
        return raw, json.loads(raw)
    except (OSError, ValueError):
        return None


# -- what the bundle shows -------------------------------------------------------------------


def _criteria(result: Any) -> list[dict[str, Any]]:
    return [{"name": c.name, "type": c.type, "weight": c.weight, "score": c.score,
             "passed": c.passed, "detail": c.detail, "error_kind": c.error_kind}
            for c in result.criteria]


def scenario_diff(before: Sequence[Any], after: Sequence[Any]) -> dict[str, Any]:
    """Fixed / regressed / unchanged between two result lists (ScenarioResult-like objects)."""
    old = {r.scenario_id: r for r in before}
    out: dict[str, list[dict[str, Any]]] = {"fixed": [], "regressed": [], "unchanged": []}
    for result in sorted(after, key=lambda r: r.scenario_id):
        prior = old.get(result.scenario_id)
        if prior is None:
            continue
        status = ("fixed" if result.passed and not prior.passed else
                  "regressed" if prior.passed and not result.passed else "unchanged")
        entry: dict[str, Any] = {"scenario_id": result.scenario_id, "set": result.set,
                                 "score_a": prior.score, "score_b": result.score,
                                 "passed": result.passed}
        if status != "unchanged":
            # What a reviewer needs to judge the flip without opening results.jsonl.
            entry.update(tags=list(result.tags), prompt=result.prompt,
                         reference=result.reference, response_a=prior.response,
                         response_b=result.response, criteria_a=_criteria(prior),
                         criteria_b=_criteria(result))
        out[status].append(entry)
    return {**out, "fixed_count": len(out["fixed"]), "regressed_count": len(out["regressed"]),
            "unchanged_count": len(out["unchanged"])}


def failure_patterns(results: Sequence[Any]) -> list[dict[str, Any]]:
    """Failed criteria of failed results grouped by (criterion type, error kind), largest first."""
    groups: dict[tuple[str, str], list[str]] = {}
    for result in results:
        if result.passed:
            continue
        failing = [c for c in result.criteria if not c.passed] or []
        keys = {(c.type, c.error_kind or "wrong_answer") for c in failing} or {
            ("judge" if result.judge_error else "score", "below_pass_mark")}
        for key in sorted(keys):
            groups.setdefault(key, []).append(result.scenario_id)
    patterns = [{"criterion_type": kind, "error_kind": error, "count": len(ids),
                 "examples": sorted(ids)[:_MAX_EXAMPLES]}
                for (kind, error), ids in groups.items()]
    return sorted(patterns, key=lambda p: (-int(p["count"]), p["criterion_type"]))


def training_curve(log_path: Path) -> list[dict[str, Any]]:
    """The ``"event": "metric"`` lines of a trainer log: step, reward_mean, kl, loss."""
    points: list[dict[str, Any]] = []
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return points
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "metric" and "step" in event:
            points.append({key: event.get(key) for key in ("step", "reward_mean", "kl", "loss")})
    return sorted(points, key=lambda p: int(p["step"]))


def composite_by_iteration(events: Sequence[Recorded[LedgerEvent]]) -> list[dict[str, Any]]:
    from modelsmith.loop.promotion.policy import iteration_of

    return [{"iteration": iteration_of(r.event.adapter), "tag": r.event.tag,
             "adapter": r.event.adapter, "composite": r.event.composite,
             "held_out": r.event.held_out, "passed": r.event.passed, "ts": r.ts}
            for r in events if isinstance(r.event, EvalFinished)]


def _with_intervals(points: list[dict[str, Any]], evals: Path) -> list[dict[str, Any]]:
    """Each point with its summary's 95% intervals (None in summaries written before them)."""
    for point in points:
        loaded = _read_json(evals / str(point["tag"]) / "summary.json")
        summary = loaded[1] if loaded and isinstance(loaded[1], dict) else {}
        point["composite_ci95"] = summary.get("composite_ci95")
        point["held_out_ci95"] = summary.get("held_out_ci95")
    return points


def comparison(cluster: Cluster, baseline_tag: str | None, tag: str) -> dict[str, Any] | None:
    """eval.compare of the baseline and the candidate as built-ins; None without a baseline."""
    import msgspec

    from modelsmith.loop.cluster.fleet import ClusterRuntime
    from modelsmith.loop.eval.service import compare_evals

    if baseline_tag is None:
        return None
    try:
        # The comparison reads only the two evals' files: a runtime with no ledger opened.
        compared = compare_evals(ClusterRuntime(cluster=cluster), baseline_tag, tag)
    except ModelsmithError:
        return None
    built: dict[str, Any] = msgspec.to_builtins(compared)
    return built


def training_run(root: Path, entries: Sequence[Recorded[LedgerEvent]], adapter: str,
                 manifest: dict[str, Any] | None) -> dict[str, Any]:
    """How the adapter was trained: hyperparameters, stop reason, steps, base model identity.

    The hyperparameters are the trainer's own ``spec.json`` (what it actually ran with); the
    stop reason and steps are the ledger's ``iteration.advanced`` record of the adapter.
    """
    advanced = [r.event for r in entries
                if isinstance(r.event, IterationAdvanced) and r.event.adapter == adapter]
    last = advanced[-1] if advanced else None
    job_id = last.train_job if last else (manifest or {}).get("job_id")
    started = [r.event for r in entries
               if isinstance(r.event, TrainStarted) and r.event.job_id == job_id]
    work_dir = Path(started[-1].work_dir) if started else root / "train" / str(job_id)
    spec = _read_json(work_dir / "spec.json")
    spec_value = spec[1] if spec and isinstance(spec[1], dict) else {}
    hyper = {key: spec_value[key] for key in ("lora", "grpo", "convergence", "rollout")
             if key in spec_value}
    return {
        "train_job": job_id, "stop_reason": last.stop_reason if last else None,
        "steps": last.steps if last else None,
        "hyperparameters": hyper or None,
        "hyperparameters_source": (f"{work_dir.name}/spec.json" if hyper else None),
        "base_model": (manifest or {}).get("base_model"),
        "base_model_sha256": (manifest or {}).get("base_model_sha256"),
        "near_miss_margin": (manifest or {}).get("near_miss_margin"),
        "init_adapter": (manifest or {}).get("init_adapter"),
    }


def _leakage_proof(cluster: Cluster, manifest: dict[str, Any] | None) -> dict[str, Any]:
    from modelsmith.loop.scoring.scenarios import load_catalog, prompt_hash, scenario_hash

    manifest = manifest or {}
    trained = [s for s in manifest.get("scenarios", []) if isinstance(s, dict)]
    try:
        held = load_catalog(cluster.scenarios_dir).held_out.scenarios
    except ModelsmithError as exc:
        return {"ok": False, "error": exc.message, "trainer_check_ok": False}
    held_ids = {s.id for s in held}
    held_hashes = {scenario_hash(s) for s in held} | {prompt_hash(s) for s in held}
    ids = sorted({str(s.get("id")) for s in trained} & held_ids)
    hashes = sorted({str(s.get("hash")) for s in trained} & held_hashes)
    own = manifest.get("leakage_check")
    own_ok = isinstance(own, dict) and own.get("ok") is True
    return {"ok": own_ok and not ids and not hashes, "trainer_check_ok": own_ok,
            "trainer_check": own, "trained_count": len(trained), "held_out_count": len(held),
            "held_out_ids_sha256": sha256_hex("\n".join(sorted(held_ids)).encode()),
            "overlapping_ids": ids, "overlapping_hashes": hashes}


# -- building --------------------------------------------------------------------------------


def _find(events: Sequence[Recorded[LedgerEvent]], kinds: tuple[type[Any], ...], request_id: str
          ) -> Any:
    found = [r.event for r in events
             if isinstance(r.event, kinds) and getattr(r.event, "request_id", None) == request_id]
    return found[-1] if found else None


def receipts(cluster: Cluster, entries: Sequence[Recorded[LedgerEvent]], request: dict[str, Any],
             candidate_summary: dict[str, Any] | None) -> dict[str, Any]:
    """The receipts as of the request: the ledger up to its ``promotion.requested``, the set
    versions the candidate was evaluated on, every named engine evaluated by then."""
    from modelsmith.loop.eval.report import build_report, full_evals, report_table

    request_id = request.get("request_id")
    upto: list[Recorded[LedgerEvent]] = []
    generated_at = ""
    for recorded in entries:
        upto.append(recorded)
        if isinstance(recorded.event, PromotionRequested) and recorded.event.request_id == request_id:
            generated_at = recorded.ts
            break
    versions = dict((candidate_summary or {}).get("scenario_sets") or {})
    engines = sorted({e.engine for e in full_evals(upto) if e.engine is not None})
    report = build_report(cluster.name, cluster.root / "evals", upto, versions=versions,
                          champion=(request.get("champion") or {}).get("adapter"),
                          candidate=(request.get("adapter") or {}).get("name"),
                          engines=engines, generated_at=generated_at)
    return {"cluster": report.cluster, "as_of": generated_at, "scenario_sets": report.scenario_sets,
            "tags": report.tags, "rows": report_table(report)}


def _manifest_text(files: dict[str, bytes]) -> bytes:
    return "".join(f"{sha256_hex(data)}  {name}\n"
                   for name, data in sorted(files.items())).encode()


def build_bundle(cluster: Cluster, entries: Sequence[Recorded[LedgerEvent]], request_id: str,
                 key: DaemonKey | None = None) -> BuiltBundle:
    """Write the evidence bundle of ``request_id`` (replacing an older export of it).

    ``entries`` are the cluster's ledger events; ``key`` signs MANIFEST. Raises NotFound when
    the ledger has no such request.
    """
    from modelsmith.loop.eval.run import RESULTS_FILE, read_results
    from modelsmith.loop.promotion.bundle_charts import (
        composite_chart,
        receipts_chart,
        training_chart,
    )
    from modelsmith.loop.promotion.bundle_html import BundlePage, render_page

    root = cluster.root
    requested: PromotionRequested | None = _find(entries, (PromotionRequested,), request_id)
    if requested is None:
        raise NotFound(f"no promotion request {request_id!r}", data={"request_id": request_id})
    files: dict[str, bytes] = {}
    loaded = _read_json(root / requested.file)
    if loaded is None:
        raise NotFound(f"promotion record {requested.file} is missing",
                       data={"file": requested.file})
    files["record/promotion-request.json"], request = loaded
    decided: PromotionApproved | PromotionRejected | None = _find(
        entries, (PromotionApproved, PromotionRejected), request_id)
    decision: dict[str, Any] | None = None
    if decided is not None and (found := _read_json(root / decided.decision_file)):
        files["record/decision.json"], decision = found
    status = "pending" if decided is None else decided.KIND.split(".")[1]

    tag = str(request["eval"]["tag"])
    evals = root / "evals"
    candidate = _read_json(evals / tag / "summary.json")
    if candidate is not None:
        files["evals/candidate-summary.json"] = candidate[0]
    champion_tag = (request.get("champion") or {}).get("eval_tag")
    # The gate's own baseline (champion, else the base model's eval) is what the diff shows.
    baseline_tag = (champion_tag or (request.get("regressions") or {}).get("baseline_tag")
                    or ((candidate[1] if candidate else {}).get("regressions") or
                        {}).get("baseline_tag"))
    baseline_label = (f"champion eval {champion_tag}" if champion_tag else
                      f"baseline eval {baseline_tag}" if baseline_tag else "no baseline")
    baseline = _read_json(evals / str(baseline_tag) / "summary.json") if baseline_tag else None
    if baseline is not None:
        files["evals/baseline-summary.json"] = baseline[0]
    results = read_results(evals / tag / RESULTS_FILE)
    before = read_results(evals / str(baseline_tag) / RESULTS_FILE) if baseline_tag else []
    diff = {"baseline_tag": baseline_tag, "candidate_tag": tag, **scenario_diff(before, results)}
    patterns = failure_patterns(results)
    compared = comparison(cluster, str(baseline_tag) if baseline_tag else None, tag)
    files["analysis/diff.json"] = _json_bytes(diff)
    if compared is not None:
        files["analysis/comparison.json"] = _json_bytes(compared)
    files["analysis/failure-patterns.json"] = _json_bytes(patterns)

    adapter = str(request["adapter"]["name"])
    manifest_loaded = _read_json(root / "adapters" / adapter / "training_manifest.json")
    manifest = manifest_loaded[1] if manifest_loaded else None
    if manifest_loaded is not None:
        files["training/training_manifest.json"] = manifest_loaded[0]
    proof = _leakage_proof(cluster, manifest)
    files["training/leakage-proof.json"] = _json_bytes(proof)
    run = training_run(root, entries, adapter, manifest)
    files["training/run.json"] = _json_bytes(run)
    log_name = (manifest or {}).get("metrics_log")
    curve = training_curve(root / str(log_name)) if log_name else []
    by_iteration = _with_intervals(composite_by_iteration(entries), evals)
    files["analysis/training-curve.json"] = _json_bytes(curve)
    files["analysis/composite-by-iteration.json"] = _json_bytes(by_iteration)
    threshold = request.get("policy", {}).get("composite_threshold")
    training_svg = training_chart(curve)
    composite_svg = composite_chart(by_iteration, threshold)
    files["charts/training-curve.svg"] = training_svg.encode()
    files["charts/composite-by-iteration.svg"] = composite_svg.encode()
    receipt = receipts(cluster, entries, request, candidate[1] if candidate else None)
    receipts_svg = receipts_chart(receipt["rows"], threshold)
    files["analysis/receipts.json"] = _json_bytes(receipt)
    files["charts/receipts.svg"] = receipts_svg.encode()
    from modelsmith.loop.eval.judge_check import judge_checks_as_of

    judges = judge_checks_as_of(entries, request_id)
    files["analysis/judges.json"] = _json_bytes(judges)

    listing = [(name, sha256_hex(data), len(data))
               for name, data in sorted(files.items())]
    page = BundlePage(
        request=request, status=status, decision=decision,
        candidate_summary=candidate[1] if candidate else None,
        baseline_summary=baseline[1] if baseline else None, baseline_label=baseline_label,
        diff=diff, comparison=compared, failure_patterns=patterns, training_manifest=manifest,
        training_run=run, leakage_proof=proof,
        training_chart_svg=training_svg, composite_chart_svg=composite_svg, files=listing,
        receipts=receipt, receipts_chart_svg=receipts_svg, judges=judges)
    files["index.html"] = render_page(page).encode()
    manifest_bytes = _manifest_text(files)
    files[MANIFEST] = manifest_bytes
    if key is not None:
        files[MANIFEST_SIG] = _json_bytes({"alg": "ed25519", "key_id": key.key_id,
                                           "public_key": key.public_key_b64,
                                           "value": key.sign(manifest_bytes)})
    return _write(root / "bundles", request_id, files)


def _tarball(request_id: str, files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    # mtime 0 everywhere: the same bundle content gives the same tarball bytes.
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{request_id}/{name}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _write(bundles: Path, request_id: str, files: dict[str, bytes]) -> BuiltBundle:
    final = bundles / request_id
    staging = bundles / f".{request_id}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tarball = _tarball(request_id, files)
    for name, data in files.items():
        atomic_write_bytes(staging / name, data)
    atomic_write_bytes(staging / TARBALL, tarball)
    # Swap in the complete directory; an older export goes aside first, then away.
    old = bundles / f".{request_id}.old-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(bundles)
    shutil.rmtree(old, ignore_errors=True)
    return BuiltBundle(directory=final, html=final / "index.html", tarball=final / TARBALL,
                       tarball_sha256=sha256_hex(tarball), files=len(files))


# -- verifying -------------------------------------------------------------------------------


def _check_files(files: dict[str, bytes], where: str, trusted_key: str | None) -> list[str]:
    problems: list[str] = []
    manifest = files.get(MANIFEST)
    if manifest is None:
        return [f"{where}: no {MANIFEST}"]
    listed: set[str] = set()
    for number, line in enumerate(manifest.decode("utf-8", "replace").splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            problems.append(f"{where}: {MANIFEST} line {number} is malformed")
            continue
        listed.add(name)
        data = files.get(name)
        if data is None:
            problems.append(f"{where}: {name} is listed but missing")
        elif sha256_hex(data) != digest:
            problems.append(f"{where}: {name} does not match its sha256 (altered)")
    for name in sorted(set(files) - listed - {MANIFEST, MANIFEST_SIG, TARBALL}):
        problems.append(f"{where}: {name} is not listed in {MANIFEST}")
    problems.extend(_check_signature(files, manifest, where, trusted_key))
    return problems


def _check_signature(files: dict[str, bytes], manifest: bytes, where: str,
                     trusted_key: str | None) -> list[str]:
    from modelsmith.loop.records.signing import verify_record, verify_signature

    signature = files.get(MANIFEST_SIG)
    if signature is None:
        return [f"{where}: {MANIFEST_SIG} is missing"] if trusted_key else []
    try:
        block = json.loads(signature)
        key = str(block["public_key"])
        if trusted_key is not None and key != trusted_key:
            return [f"{where}: {MANIFEST_SIG} is by another key than the trusted daemon key"]
        verify_signature(manifest, str(block["value"]), key)
        request = files.get("record/promotion-request.json")
        if request is not None:
            verify_record(json.loads(request), key)
    except (ValueError, KeyError, TypeError):
        return [f"{where}: {MANIFEST_SIG} is malformed"]
    except ModelsmithError as exc:
        return [f"{where}: signature check failed: {exc.message}"]
    return []


def _tar_files(path: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            _, _, name = member.name.partition("/")  # drop the <request_id>/ prefix
            handle = tar.extractfile(member)
            if handle is not None:
                files[name] = handle.read()
    return files


def verify_bundle(path: Path, trusted_public_key_b64: str | None = None) -> list[str]:
    """Check a bundle directory or ``bundle.tar.gz`` against its MANIFEST; problems as text.

    Works offline. The MANIFEST signature (and the request record's) is checked against the key
    it names, or against ``trusted_public_key_b64`` when given. A directory's tarball is checked
    too. Raises NotFound when ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise NotFound(f"no bundle at {path}", data={"file": str(path)})
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p.read_bytes()
                 for p in sorted(path.rglob("*")) if p.is_file()}
        problems = _check_files(files, path.name, trusted_public_key_b64)
        if (path / TARBALL).is_file():
            problems += verify_bundle(path / TARBALL, trusted_public_key_b64)
        return problems
    try:
        files = _tar_files(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [f"{path.name}: not a readable tar.gz ({exc})"]
    return _check_files(files, path.name, trusted_public_key_b64)
