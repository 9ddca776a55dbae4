"""``modelsmith loop start|pause|resume|stop|status``: the autonomous loop of a cluster."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from modelsmith.clients import render


def cmd_loop(args: argparse.Namespace) -> int:
    from modelsmith.clients.cli import call, emit_json

    if args.action == "status":
        result = call(args, "loop.status", {"cluster": args.cluster} if args.cluster else {})
        loops = result["loops"]
    else:
        if not args.cluster:
            print(f"modelsmith: loop {args.action} needs a CLUSTER", file=sys.stderr)
            return 2
        loops = [call(args, f"loop.{args.action}", {"cluster": args.cluster})]
        result = loops[0]
    if args.json:
        emit_json(result)
        return 0
    rows = [(s["cluster"], s["state"], "yes" if s["active"] else "no", s["run"]["iterations"],
             s["current_job"] or "—", s["reason"]) for s in loops]
    sys.stdout.write(render.table(rows, ["cluster", "state", "running", "iterations", "job", "reason"]))
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("loop", cmd_loop, "the autonomous loop: start | pause | resume | stop | status")
    p.add_argument("action", choices=["start", "pause", "resume", "stop", "status"])
    p.add_argument("cluster", nargs="?")
