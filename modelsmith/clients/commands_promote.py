"""CLI commands of the promotion gate: policy check, promote, approve, reject, rollback, bundle.

``approve``, ``reject`` and ``rollback`` sign an approval statement with the reviewer's own SSH
key (``ssh-keygen -Y sign``, run here, on the reviewer's side) and send only the statement and
the signature: the daemon never sees the key. Standard library, msgspec and the stdlib-only
approval helpers: nothing heavy on this path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, call, emit_error_json, emit_json
from modelsmith.errors import GateFailed
from modelsmith.rpc.schema.promotion import (
    BundleExported,
    PolicyCheck,
    PolicyReport,
    PromotionDecided,
    PromotionHistory,
    PromotionRequested,
    PromotionView,
    RollbackDone,
)

KEY_ENV = "MODELSMITH_APPROVAL_KEY"
DEFAULT_KEY = "~/.ssh/id_ed25519"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _check_lines(checks: Sequence[PolicyCheck]) -> list[str]:
    width = max((len(c.check) for c in checks), default=10) + 2
    return [f"    {'PASS' if c.passed else 'FAIL'}  {c.check:<{width}}{c.detail}"
            for c in checks]


# -- policy check / promote -------------------------------------------------------------------


def cmd_policy(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"cluster": args.cluster}
    if args.eval:
        params["eval_tag"] = args.eval
    report = call(args, "policy.check", params, PolicyReport)
    if args.json:
        emit_json(report)
    else:
        failed = sum(not c.passed for c in report.checks)
        print(f"\n  Policy check  ·  {report.cluster}")
        print(f"    Adapter:   {report.adapter or '—'}   Eval tag: {report.eval_tag or '—'}")
        print(f"    Composite: {_pct(report.composite)}   Held-out: {_pct(report.held_out)}")
        print("\n".join(_check_lines(report.checks)))
        verdict = "PASS" if report.passed else f"FAIL ({failed} of {len(report.checks)} " \
            "checks failed)"
        print(f"  Result: {verdict}")
    return ExitCode.OK if report.passed else ExitCode.GATE_FAILED


def promote_block(result: PromotionRequested) -> str:
    """The issue's ``modelsmith promote`` output, then how a human approves."""
    lines = [
        "  Promotion request",
        f"    Cluster:   {result.cluster}",
        f"    Model:     {result.model}",
        f"    Iteration: {result.iteration}",
        f"    Composite: {_pct(result.composite)}",
        f"    Eval tag:  {result.eval_tag}",
        f"    Adapter:   {result.adapter_path}",
        "  Promotion record written.",
        f"    Directory: {result.directory}",
        f"    Latest:    {result.file}",
        "",
        f"  Awaiting approval by {result.required_approvals} reviewer(s). A reviewer approves "
        "with their own SSH key:",
        f"    {result.approve_command}",
        "  or rejects it:",
        f"    {result.reject_command}",
        f"  Evidence bundle: modelsmith bundle {result.cluster} {result.request_id}",
    ]
    return "\n".join(lines) + "\n"


def cmd_promote(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"cluster": args.cluster}
    if args.eval:
        params["eval_tag"] = args.eval
    if args.note:
        params["note"] = args.note
    try:
        result = call(args, "promote.request", params, PromotionRequested)
    except GateFailed as exc:
        if args.json:
            emit_error_json(exc)
        else:
            print(f"  Promotion refused: the policy gate failed for {args.cluster}")
            checks = msgspec.convert(exc.data.get("checks", []), list[PolicyCheck])
            print("\n".join(_check_lines([c for c in checks if not c.passed])))
        return ExitCode.GATE_FAILED
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(promote_block(result))
    return ExitCode.OK


def cmd_promotions(args: argparse.Namespace) -> int:
    history = call(args, "promote.history", {"cluster": args.cluster}, PromotionHistory)
    if args.json:
        emit_json(history)
        return ExitCode.OK
    print(f"\n  Promotions  ·  {history.cluster}   champion: {history.champion or 'base'}")
    rows = [(r.request_id, r.status, r.adapter, r.eval_tag, r.requested_at) for r in history.requests]
    sys.stdout.write(render.table(rows, ["request", "status", "adapter", "eval", "requested"]))
    if history.rollback_default is not None:
        print(f"  rollback target: iteration {history.rollback_default}")
    return ExitCode.OK


# -- signing decisions ---------------------------------------------------------------------------


def _key_path(args: argparse.Namespace) -> Path:
    return Path(args.key or os.environ.get(KEY_ENV) or DEFAULT_KEY).expanduser()


def _sign(args: argparse.Namespace, statement: bytes) -> str:
    from modelsmith.loop.records.ssh_sign import sign_with_ssh_keygen

    return sign_with_ssh_keygen(statement, _key_path(args))


def _decide(args: argparse.Namespace, decision: str, reason: str) -> int:
    from modelsmith.errors import SignatureError
    from modelsmith.hashing import sha256_hex
    from modelsmith.loop.records.approval import make_statement

    view = call(args, "promote.get", {"cluster": args.cluster, "request_id": args.request_id},
                PromotionView)
    # Hash the bytes ourselves: the reviewer signs what they can see, not a digest they are told.
    digest = sha256_hex(view.record_text.encode("utf-8"))
    if digest != view.sha256:
        raise SignatureError("the request record does not match the digest in the ledger",
                             data={"reason": "tampered", "request_id": args.request_id})
    record = view.record
    if not args.json:
        print(f"  {decision.capitalize()} {args.request_id} of {args.cluster}: "
              f"{record['adapter']['name']} (iteration {record['iteration']}), "
              f"composite {_pct(record['eval']['composite'])}, eval {record['eval']['tag']}")
        print(f"    record sha256 {digest}")
    statement = make_statement(cluster=args.cluster, decision=decision,  # type: ignore[arg-type]
                               reason=reason, request_id=args.request_id, request_digest=digest)
    signature = _sign(args, statement)
    params: dict[str, Any] = {"cluster": args.cluster, "request_id": args.request_id,
                              "statement": statement.decode("utf-8"), "signature": signature}
    if args.principal:
        params["principal"] = args.principal
    result = call(args, "promote.decide", params, PromotionDecided)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    if result.status == "pending":
        print(f"  Approval by {result.principal} recorded: {len(result.approvals)} of "
              f"{result.required_approvals} needed.")
    elif result.status == "approved":
        print(f"  Approved by {', '.join(result.approvals)}. Champion: {result.champion} "
              f"(engine: {result.engine}).")
        print(f"    Decision record: {result.decision_file}")
    else:
        print(f"  Rejected by {result.principal}: {reason}")
        print(f"    Decision record: {result.decision_file}")
    return ExitCode.OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve", args.reason or "approved")


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, "reject", args.reason)


def cmd_rollback(args: argparse.Namespace) -> int:
    from modelsmith.errors import NotFound
    from modelsmith.loop.records.approval import make_statement

    to_iteration = args.to
    if to_iteration is None:
        history = call(args, "promote.history", {"cluster": args.cluster}, PromotionHistory)
        to_iteration = history.rollback_default
        if to_iteration is None:
            raise NotFound(f"{args.cluster} has no earlier approved iteration to roll back to",
                           data={"cluster": args.cluster})
    statement = make_statement(cluster=args.cluster, decision="rollback",
                               reason=args.reason or f"rollback to iteration {to_iteration}",
                               to_iteration=to_iteration)
    params: dict[str, Any] = {"cluster": args.cluster, "statement": statement.decode("utf-8"),
                              "signature": _sign(args, statement)}
    if args.principal:
        params["principal"] = args.principal
    result = call(args, "promote.rollback", params, RollbackDone)
    if args.json:
        emit_json(result)
    else:
        print(f"  Rolled back {args.cluster}: champion {result.previous_champion or 'base'} "
              f"-> {result.adapter or 'base'} (engine: {result.engine}).")
        print(f"    Record: {result.file}")
    return ExitCode.OK


# -- bundle ----------------------------------------------------------------------------------------


def cmd_bundle(args: argparse.Namespace) -> int:
    if args.target == "verify":
        return _bundle_verify(args, Path(args.second))
    result = call(args, "bundle.export", {"cluster": args.target, "request_id": args.second},
                  BundleExported)
    if args.json:
        emit_json(result)
    else:
        print(f"  Evidence bundle written ({result.files} files).")
        print(f"    Open:    file://{result.html}")
        print(f"    Archive: {result.tarball}")
        print(f"    sha256:  {result.tarball_sha256}")
    return ExitCode.OK


def _bundle_verify(args: argparse.Namespace, path: Path) -> int:
    """Offline: no daemon. A ``--home`` with the daemon's public key pins the signer."""
    from modelsmith.loop.promotion.bundle import verify_bundle

    trusted = None
    if args.home:
        from modelsmith.loop.promotion.record_files import trusted_daemon_key

        trusted = trusted_daemon_key(Path(args.home))
    problems = verify_bundle(path, trusted)
    if args.json:
        emit_json({"ok": not problems, "path": str(path), "problems": problems})
    elif problems:
        print(f"  Bundle {path}: FAILED")
        for problem in problems:
            print(f"    {problem}")
    else:
        print(f"  Bundle {path}: OK (every file matches MANIFEST)")
    return ExitCode.OK if not problems else ExitCode.GATE_FAILED


def register(sub: Any, add: Any) -> None:
    p = add("policy", cmd_policy, "promotion policy gate: every check (exit 0 pass, 1 fail)")
    p.add_argument("action", choices=["check"], help="check (the only action)")
    p.add_argument("cluster", help="the cluster whose candidate to judge")
    p.add_argument("--eval", metavar="TAG", help="the eval to judge (default: the candidate's newest)")

    p = add("promote", cmd_promote, "request promotion of the candidate (exit 1 if the gate fails)")
    p.add_argument("cluster", help="the cluster whose candidate to promote")
    p.add_argument("--eval", metavar="TAG", help="the eval the request rests on (default: the candidate's newest)")
    p.add_argument("--note", help="a note for the reviewer, kept in the request")

    p = add("promotions", cmd_promotions, "promotion requests, champions and rollback target")
    p.add_argument("cluster", help="the cluster to list")

    signing = [("--key", {"help": f"your SSH key (default: ${KEY_ENV} or {DEFAULT_KEY})"}),
               ("--principal", {"help": "your principal in allowed_signers"})]
    p = add("approve", cmd_approve, "approve a promotion request with your SSH key")
    p.add_argument("cluster", help="the cluster of the request")
    p.add_argument("request_id", help="the request to approve (see `modelsmith promotions`)")
    p.add_argument("--reason", help="why, recorded with your signature")
    for flag, options in signing:
        p.add_argument(flag, **options)

    p = add("reject", cmd_reject, "reject a promotion request with your SSH key")
    p.add_argument("cluster", help="the cluster of the request")
    p.add_argument("request_id", help="the request to reject (see `modelsmith promotions`)")
    p.add_argument("--reason", required=True, help="why, recorded with your signature")
    for flag, options in signing:
        p.add_argument(flag, **options)

    p = add("rollback", cmd_rollback, "serve an earlier approved iteration again (signed)")
    p.add_argument("cluster", help="the cluster to roll back")
    p.add_argument("--to", type=int, metavar="ITERATION", help="default: the previous champion")
    p.add_argument("--reason", help="why, recorded with your signature")
    for flag, options in signing:
        p.add_argument(flag, **options)

    p = add("bundle", cmd_bundle,
            "bundle CLUSTER REQUEST_ID: write the evidence bundle; bundle verify PATH: check one")
    p.add_argument("target", metavar="CLUSTER|verify", help="the cluster, or `verify`")
    p.add_argument("second", metavar="REQUEST_ID|PATH", help="the request to bundle, or the bundle to verify")
    p.add_argument("--home", help="verify: trust only this home's daemon key")
