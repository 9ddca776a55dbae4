"""Entry point of the daemon process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from modelsmith.errors import ModelsmithError
from modelsmith.rpc.address import resolve_home, resolve_socket_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelsmith daemon", description="Run the Modelsmith daemon in the foreground.")
    parser.add_argument("--home", help="state root (default: $MODELSMITH_HOME or ./.iterate)")
    parser.add_argument("--socket", help="socket path (default: $MODELSMITH_SOCKET or $XDG_RUNTIME_DIR/modelsmith/modelsmith.sock)")
    parser.add_argument("--config", help="daemon config file (default: <home>/modelsmith.toml if present)")
    parser.add_argument("--no-engines", action="store_true", help="do not start inference engines at startup")
    return parser


def served_socket_path(configured: Path) -> Path:
    """The socket the daemon will really serve: under socket activation, the inherited one.

    READY's STATUS line, the log and ``daemon.status`` report this path, so it must be the
    socket systemd (or ``systemd-socket-activate -l PATH``) bound, not the one ``--socket`` or
    ``$MODELSMITH_SOCKET`` would have named. The fds stay where they are: the daemon takes
    them when it starts listening.
    """
    from modelsmith.daemon.listener import bound_path
    from modelsmith.daemon.sdnotify import listen_fds

    fds = listen_fds(unset_environment=False)
    if not fds:
        return configured
    served = bound_path(fds[0])
    if served is None:
        return configured
    if served != configured:
        import structlog

        structlog.get_logger("modelsmith.daemon").warning(
            "serving the socket passed by socket activation, not the configured one",
            socket=str(served), configured=str(configured),
        )
    return served


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from modelsmith.daemon.app import Daemon
    from modelsmith.daemon.config import load_daemon_config
    from modelsmith.daemon.listener import refuse_non_socket
    from modelsmith.daemon.logs import configure_logging
    from modelsmith.daemon.sdnotify import listen_fds

    home = resolve_home(args.home)
    try:
        config = load_daemon_config(Path(args.config) if args.config else None, home)
    except ModelsmithError as exc:
        print(f"modelsmith daemon: {exc}", file=sys.stderr)
        return 2
    if args.no_engines:
        config = config.model_copy(update={"start_engines": False})
    configure_logging(config.log_format, config.log_level)
    socket_path = served_socket_path(resolve_socket_path(args.socket or config.socket))
    daemon = Daemon(home=home, socket_path=socket_path, config=config)
    try:
        if not listen_fds(unset_environment=False):
            # Before any cluster is opened: a --socket aimed at a ledger must touch nothing.
            refuse_non_socket(socket_path)
        anyio.run(daemon.run)
    except ModelsmithError as exc:
        print(f"modelsmith daemon: {exc}", file=sys.stderr)
        return 4 if exc.code == 1003 else 1
    except KeyboardInterrupt:
        return 130
    return 0
