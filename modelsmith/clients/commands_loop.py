"""``modelsmith loop start|pause|resume|stop|status``: the autonomous loop of a cluster."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, UsageError, call, emit_json
from modelsmith.rpc.schema.loop import LoopStatus, LoopStatuses


def cmd_loop(args: argparse.Namespace) -> int:
    result: LoopStatus | LoopStatuses
    if args.action == "status":
        result = call(args, "loop.status", {"cluster": args.cluster} if args.cluster else {}, LoopStatuses)
        loops = result.loops
    else:
        if not args.cluster:
            raise UsageError(f"loop {args.action} needs a CLUSTER")
        result = call(args, f"loop.{args.action}", {"cluster": args.cluster}, LoopStatus)
        loops = [result]
    if args.json:
        emit_json(result)
        return ExitCode.OK
    rows = [(s.cluster, s.state, "yes" if s.active else "no", s.run["iterations"],
             s.current_job or "—", s.reason) for s in loops]
    sys.stdout.write(render.table(rows, ["cluster", "state", "running", "iterations", "job", "reason"]))
    return ExitCode.OK


def register(sub: Any, add: Any) -> None:
    p = add("loop", cmd_loop, "the autonomous loop: start | pause | resume | stop | status")
    p.add_argument("action", choices=["start", "pause", "resume", "stop", "status"], help="what to do with the loop")
    p.add_argument("cluster", nargs="?", help="the cluster (status: default every cluster)")
