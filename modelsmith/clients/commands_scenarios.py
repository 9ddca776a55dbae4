"""CLI actions of ``modelsmith scenarios`` beyond list and verify (those are in commands_eval):
``accept`` (synthetic scenarios into core, SSH-signed) and ``import-graders`` (OpenAI grader
JSON and its dataset items into a governed scenario file).

``commands_eval`` registers the ``scenarios`` command, dispatches these through :data:`ACTIONS`
and lets :func:`add_arguments` add their options. Standard library, msgspec and the RPC client
only (the CLI's hot path); the signing helpers are imported when ``accept`` runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, UsageError, call, emit_json
from modelsmith.rpc.schema.graders import MAX_IMPORT_BYTES, ImportGradersResult
from modelsmith.rpc.schema.synth import ScenariosAccepted, SynthList


def _need_cluster(args: argparse.Namespace) -> str:
    if not args.cluster:
        raise UsageError(f"scenarios {args.action} needs --cluster")
    return str(args.cluster)


# -- accept ---------------------------------------------------------------------------------------


def cmd_accept(args: argparse.Namespace) -> int:
    """Sign an acceptance of synthetic scenarios (their ids and content hashes, as listed by the
    daemon and hashed here) with the reviewer's SSH key, and send statement and signature."""
    import os

    from modelsmith.clients.commands_promote import DEFAULT_KEY, KEY_ENV
    from modelsmith.loop.records.approval import make_statement
    from modelsmith.loop.records.ssh_sign import sign_with_ssh_keygen
    from modelsmith.loop.synth.acceptance import ACCEPT_REQUEST_ID, acceptance_digest

    ids = list(args.ids or [])
    # `scenarios accept CLUSTER ID...` (the cluster first), or `--cluster C ID...`.
    cluster = args.cluster or (ids.pop(0) if ids else _need_cluster(args))
    if not ids:
        raise UsageError("scenarios accept CLUSTER ID [ID ...]: the synthetic scenarios to accept")
    listed = call(args, "synth.list", {"cluster": cluster}, SynthList)
    by_id = {s.id: s for s in listed.scenarios}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UsageError(f"not synthetic scenarios of {cluster}: {', '.join(missing[:5])}")
    digest = acceptance_digest(cluster, [(i, by_id[i].sha256) for i in ids])
    statement = make_statement(cluster=cluster, decision="accept", reason=args.reason or "",
                               request_id=ACCEPT_REQUEST_ID, request_digest=digest)
    key = Path(args.key or os.environ.get(KEY_ENV) or DEFAULT_KEY).expanduser()
    params: dict[str, Any] = {"cluster": cluster, "ids": ids,
                              "statement": statement.decode("utf-8"),
                              "signature": sign_with_ssh_keygen(statement, key)}
    if args.principal:
        params["principal"] = args.principal
    result = call(args, "scenarios.accept", params, ScenariosAccepted)
    if args.json:
        emit_json(result)
    else:
        print(f"  Accepted {len(result.ids)} scenarios into core ({result.file}), "
              f"signed by {result.principal}")
    return ExitCode.OK


# -- import-graders -------------------------------------------------------------------------------


def _read(path: str, what: str) -> str:
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise UsageError(f"{what} {path}: {size} bytes; at most {MAX_IMPORT_BYTES} are sent")
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def cmd_import_graders(args: argparse.Namespace) -> int:
    cluster = _need_cluster(args)
    files = list(args.ids or [])
    if len(files) != 1 or args.set is None or args.items is None:
        raise UsageError("scenarios import-graders FILE --cluster C --set core|held-out "
                         "--items ITEMS.jsonl")
    name = args.name or Path(files[0]).name.split(".")[0]
    params: dict[str, Any] = {
        "cluster": cluster, "set": args.set, "name": name,
        "graders": _read(files[0], "grader file"), "items": _read(args.items, "items file"),
        "dry_run": args.dry_run,
    }
    for key in ("judge_engine", "prompt", "reference", "domain", "pass_mark"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    result = call(args, "scenarios.import_graders", params, ImportGradersResult)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    rows = [(m.grader, m.type, m.criterion, m.note) for m in result.mapping]
    sys.stdout.write(render.table(rows, ["grader", "type", "criterion", "note"]))
    verb = "would import" if result.dry_run else "imported"
    print(f"  {verb} {result.scenarios} scenarios into {result.cluster}/{result.set} as {result.name}")
    for file in result.files:
        print(f"  wrote {file}")
    if result.changed:
        print(f"  new set versions recorded: {', '.join(result.changed)}")
    return ExitCode.OK


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "accept": cmd_accept,
    "import-graders": cmd_import_graders,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the actions above, on the ``scenarios`` parser."""
    p.add_argument("ids", nargs="*", metavar="ID|FILE",
                   help="accept: the synthetic scenario ids; import-graders: the grader JSON file")
    p.add_argument("--reason", help="accept: why, recorded with your signature")
    p.add_argument("--key", help="accept: your SSH key (default: $MODELSMITH_APPROVAL_KEY or "
                   "~/.ssh/id_ed25519)")
    p.add_argument("--principal", help="accept: your principal in allowed_signers")
    p.add_argument("--set", choices=["core", "held-out"], help="import-graders: the set to add to")
    p.add_argument("--items", help="import-graders: the dataset items, JSONL (each a scenario)")
    p.add_argument("--name", help="import-graders: the file and id prefix (default: FILE's name)")
    p.add_argument("--judge-engine", help="import-graders: the engine that runs score_model and "
                   "label_model graders (a named engine, or cluster)")
    p.add_argument("--prompt", help="import-graders: the prompt template over the item "
                   "(default: {{item.input}})")
    p.add_argument("--reference", help="import-graders: the reference template (default: the "
                   "first grader's reference)")
    p.add_argument("--domain", help="import-graders: the scenarios' domain (default: the name)")
    p.add_argument("--pass-mark", type=float, help="import-graders: the rubric's pass mark "
                   "(default: from the graders' thresholds)")
    p.add_argument("--dry-run", action="store_true", help="import-graders: convert and check, "
                   "write nothing")
