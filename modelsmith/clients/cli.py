"""``modelsmith``: the tiny CLI. A thin client of the daemon's socket.

Its hot path imports only the standard library, msgspec and the RPC client; commands that need
more (``daemon``, ``mcp``) import it inside their function.

Exit codes (stable, documented in the README):
    0  ok / gate passed          1  gate failed (eval, policy check)
    2  usage error               3  daemon unreachable
    4  refused by the daemon     5  the job failed or was cancelled
  130  interrupted
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from modelsmith.clients import render
from modelsmith.errors import DaemonUnreachable, ModelsmithError
from modelsmith.rpc.client import RpcClient

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_JOB_FAILED = 5
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


def _to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_to_builtins(value), indent=2, sort_keys=False) + "\n")


def client(args: argparse.Namespace) -> RpcClient:
    return RpcClient(args.socket, timeout=args.timeout)


def call(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    with client(args) as rpc:
        return rpc.call(method, params or {})


# -- commands ------------------------------------------------------------------------------


def cmd_ping(args: argparse.Namespace) -> int:
    result = call(args, "daemon.ping")
    if args.json:
        emit_json(result)
    else:
        print(f"pong from modelsmith {result['version']} at {resolve_socket(args)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    params = {"cluster": args.cluster} if args.cluster else {}
    result = call(args, "fleet.status", params)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(render.fleet(result))
    return EXIT_OK


def cmd_daemon_status(args: argparse.Namespace) -> int:
    result = call(args, "daemon.status")
    if args.json:
        emit_json(result)
        return EXIT_OK
    print(render.header("Modelsmith Daemon"))
    for key in ("version", "pid", "home", "socket", "started_at", "clusters"):
        print(render.kv(key, result[key]))
    print(render.kv("uptime", render.duration(result["uptime_s"])))
    for engine in result["engines"]:
        print(render.kv("engine", f"{engine['name']}  {engine['state']}  {engine['model']}"))
    print(render.kv("jobs", len(result["jobs"])))
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from modelsmith.daemon.main import main as daemon_main

    forwarded: list[str] = []
    for flag in ("home", "socket", "config"):
        value = getattr(args, flag, None)
        if value:
            forwarded += [f"--{flag}", value]
    if args.no_engines:
        forwarded.append("--no-engines")
    return daemon_main(forwarded)


def cmd_jobs(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.cluster:
        params["cluster"] = args.cluster
    result = call(args, "job.list", params)
    if args.json:
        emit_json(result)
        return EXIT_OK
    rows = [
        (j["job_id"], j["kind"], j["cluster"], j["state"], f"{j['progress_done']}/{j['progress_total'] or '?'}", j["message"])
        for j in result["jobs"]
    ]
    sys.stdout.write(render.table(rows, ["job", "kind", "cluster", "state", "progress", "message"]))
    return EXIT_OK


def cmd_job_cancel(args: argparse.Namespace) -> int:
    result = call(args, "job.cancel", {"job_id": args.job_id})
    if args.json:
        emit_json(result)
    else:
        print(f"cancel requested for job {result['job_id']} ({result['kind']}, {result['cluster']})")
    return EXIT_OK


def resolve_socket(args: argparse.Namespace) -> str:
    from modelsmith.rpc.address import resolve_socket_path

    return str(resolve_socket_path(args.socket))


# -- parser --------------------------------------------------------------------------------


def command_modules() -> list[Callable[[Any, Callable[..., argparse.ArgumentParser]], None]]:
    from modelsmith.clients import (
        commands_config,
        commands_eval,
        commands_loop,
        commands_mcp,
        commands_promote,
        commands_train,
    )

    return [commands_eval.register, commands_train.register, commands_promote.register,
            commands_mcp.register, commands_config.register, commands_loop.register]


def build_parser() -> argparse.ArgumentParser:
    def common_options(defaults: bool) -> argparse.ArgumentParser:
        # The options are accepted before and after the command; a subcommand must not reset a
        # value given before it, so there its defaults are SUPPRESSed.
        def d(value: Any) -> Any:
            return value if defaults else argparse.SUPPRESS

        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--socket", default=d(None), help="daemon socket (default: $MODELSMITH_SOCKET, then $XDG_RUNTIME_DIR/modelsmith/modelsmith.sock)")
        common.add_argument("--json", action="store_true", default=d(False), help="machine-readable JSON output")
        common.add_argument("--timeout", type=float, default=d(60.0), help="seconds to wait for the daemon per call")
        return common

    common = common_options(True)
    sub_common = common_options(False)

    parser = argparse.ArgumentParser(
        prog="modelsmith",
        description="Modelsmith: eval, diagnose, post-train and promote specialists. A client of the daemon.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Command, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[sub_common], **kw)
        p.set_defaults(fn=fn)
        return p

    p = add("daemon", cmd_daemon, "run the daemon in the foreground")
    p.add_argument("--home")
    p.add_argument("--config")
    p.add_argument("--no-engines", action="store_true")

    add("ping", cmd_ping, "check that the daemon answers")
    p = add("status", cmd_status, "fleet status: every cluster's phase and scores")
    p.add_argument("--cluster", help="only this cluster")
    add("daemon-status", cmd_daemon_status, "the daemon's own status: engines, jobs, uptime")
    p = add("jobs", cmd_jobs, "list jobs")
    p.add_argument("--cluster")
    p = add("cancel", cmd_job_cancel, "cancel a job")
    p.add_argument("job_id")

    for register in command_modules():
        register(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    try:
        code: int = args.fn(args)
        return code
    except DaemonUnreachable as exc:
        print(f"modelsmith: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ModelsmithError as exc:
        if getattr(args, "json", False):
            emit_json({"error": {"code": exc.code, "name": exc.name, "message": exc.message, "data": exc.data}})
        print(f"modelsmith: {exc} [{exc.name} {exc.code}]", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
