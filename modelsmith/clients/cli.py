"""``modelsmith``: the tiny CLI. A thin client of the daemon's socket.

Its hot path imports only the standard library, msgspec, the RPC client and the wire Structs;
commands that need more (``daemon``, ``mcp``, the offline verifiers) import it inside their
function. What the commands share (the call, JSON output, the exit codes) is
:mod:`modelsmith.clients.common`; the exit codes are :class:`~modelsmith.clients.common.ExitCode`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from modelsmith.clients import (
    commands_config,
    commands_eval,
    commands_judge,
    commands_loop,
    commands_mcp,
    commands_promote,
    commands_report,
    commands_synth,
    commands_train,
    render,
)
from modelsmith.clients.common import (
    ExitCode,
    UsageError,
    call,
    emit_error_json,
    emit_json,
    report_error,
)
from modelsmith.errors import ModelsmithError
from modelsmith.rpc.schema.daemon import DaemonStatus, FleetStatus, PingResult
from modelsmith.rpc.schema.jobs import JobList, JobSummary

Command = Callable[[argparse.Namespace], int]

# Each command module adds its commands to the parser: register(subparsers, add).
COMMAND_MODULES = (commands_eval, commands_report, commands_train, commands_promote, commands_mcp,
                   commands_config, commands_loop, commands_synth, commands_judge)


# -- commands ------------------------------------------------------------------------------


def cmd_ping(args: argparse.Namespace) -> int:
    result = call(args, "daemon.ping", {}, PingResult)
    if args.json:
        emit_json(result)
    else:
        print(f"pong from modelsmith {result.version} at {resolve_socket(args)}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    params = {"cluster": args.cluster} if args.cluster else {}
    result = call(args, "fleet.status", params, FleetStatus)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(render.fleet(result))
    return ExitCode.OK


def cmd_daemon_status(args: argparse.Namespace) -> int:
    result = call(args, "daemon.status", {}, DaemonStatus)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    print(render.header("Modelsmith Daemon"))
    for key, value in (("version", result.version), ("pid", result.pid), ("home", result.home),
                       ("socket", result.socket), ("started_at", result.started_at),
                       ("clusters", result.clusters)):
        print(render.kv(key, value))
    print(render.kv("uptime", render.duration(result.uptime_s)))
    for engine in result.engines:
        print(render.kv("engine", f"{engine.name}  {engine.state}  {engine.model}"))
    print(render.kv("jobs", len(result.jobs)))
    return ExitCode.OK


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
    result = call(args, "job.list", params, JobList)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    rows = [
        (j.job_id, j.kind, j.cluster, j.state, f"{j.progress_done}/{j.progress_total or '?'}", j.message)
        for j in result.jobs
    ]
    sys.stdout.write(render.table(rows, ["job", "kind", "cluster", "state", "progress", "message"]))
    return ExitCode.OK


def cmd_job_cancel(args: argparse.Namespace) -> int:
    result = call(args, "job.cancel", {"job_id": args.job_id}, JobSummary)
    if args.json:
        emit_json(result)
    else:
        print(f"cancel requested for job {result.job_id} ({result.kind}, {result.cluster})")
    return ExitCode.OK


def cmd_completion(args: argparse.Namespace) -> int:
    # shtab is imported only here: the CLI's hot path never loads it.
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


def resolve_socket(args: argparse.Namespace) -> str:
    from modelsmith.rpc.address import resolve_socket_path

    return str(resolve_socket_path(args.socket))


# -- parser --------------------------------------------------------------------------------


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting, so that
    :func:`main` reports a bad command line like every other failure (``--json`` included).
    Subcommand parsers are built with the same class."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("modelsmith").strip()
        raise UsageError(f"{command}: {message}" if command else message,
                         data={"command": self.prog, "usage": self.format_usage().strip()})


class VersionAction(argparse.Action):
    """``--version``: print ``modelsmith X.Y.Z`` and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        # The package root is read only when asked: the CLI path's import rule names its modules.
        from modelsmith import __version__

        sys.stdout.write(f"modelsmith {__version__}\n")
        parser.exit()


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was given, for a command line the parser could not read."""
    words = list(argv)
    return "--json" in (words[:words.index("--")] if "--" in words else words)


def build_parser() -> argparse.ArgumentParser:
    def common_options(defaults: bool) -> CliParser:
        # The options are accepted before and after the command; a subcommand must not reset a
        # value given before it, so there its defaults are SUPPRESSed.
        def d(value: Any) -> Any:
            return value if defaults else argparse.SUPPRESS

        common = CliParser(add_help=False)
        common.add_argument("--socket", default=d(None), help="daemon socket (default: $MODELSMITH_SOCKET, then $XDG_RUNTIME_DIR/modelsmith/modelsmith.sock)")
        common.add_argument("--json", action="store_true", default=d(False), help="machine-readable JSON output")
        common.add_argument("--timeout", type=float, default=d(60.0), help="seconds to wait for the daemon per call")
        return common

    common = common_options(True)
    sub_common = common_options(False)

    parser = CliParser(
        prog="modelsmith",
        description="Modelsmith: eval, diagnose, post-train and promote specialists. A client of the daemon.",
        parents=[common],
    )
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Command, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[sub_common], **kw)
        p.set_defaults(fn=fn)
        return p

    p = add("daemon", cmd_daemon, "run the daemon in the foreground")
    p.add_argument("--home", help="state root (default: $MODELSMITH_HOME or ./.iterate)")
    p.add_argument("--config", help="daemon config file (default: <home>/modelsmith.toml if present)")
    p.add_argument("--no-engines", action="store_true", help="do not start inference engines at startup")

    add("ping", cmd_ping, "check that the daemon answers")
    p = add("status", cmd_status, "fleet status: every cluster's phase and scores")
    p.add_argument("--cluster", help="only this cluster")
    add("daemon-status", cmd_daemon_status, "the daemon's own status: engines, jobs, uptime")
    p = add("jobs", cmd_jobs, "list jobs")
    p.add_argument("--cluster", help="only this cluster's jobs")
    p = add("cancel", cmd_job_cancel, "cancel a job")
    p.add_argument("job_id", help="the job to cancel (see `modelsmith jobs`)")
    p = add("completion", cmd_completion, "print a shell completion script: bash or zsh",
            description="Print a completion script generated from this parser. bash: "
                        "`modelsmith completion bash > ~/.local/share/bash-completion/completions/"
                        "modelsmith`; zsh: `modelsmith completion zsh > ~/.zfunc/_modelsmith`.")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")

    for module in COMMAND_MODULES:
        module.register(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return report_error(exc, as_json=wants_json(argv))
    except SystemExit as exc:  # --help and --version
        return ExitCode.USAGE if exc.code not in (0, None) else ExitCode.OK
    as_json: bool = getattr(args, "json", False)
    try:
        code: int = args.fn(args)
        return code
    except ModelsmithError as exc:
        return report_error(exc, as_json=as_json)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as exc:
        # A bug: the agent still gets an envelope (internal_error, no text); the traceback follows.
        if as_json:
            emit_error_json(exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
