"""CLI command ``synth``: new scenarios like an eval's failure patterns, verified before kept.

Standard library, msgspec and the RPC client only (the CLI's hot path)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, call, emit_json
from modelsmith.clients.watch import follow_job
from modelsmith.rpc.schema.synth import SynthResult, SynthStarted

COUNTS = ("generated", "dropped_invalid", "dropped_reference_fails", "dropped_duplicate",
          "refused_near_held_out", "kept")


def synth_text(result: SynthResult) -> str:
    source = (f"teacher {result.teacher} ({result.teacher_model})" if result.teacher
              else f"generator {result.generator}")
    out = [render.header(f"Synthesis from {result.eval_tag}"),
           render.kv("cluster", result.cluster), render.kv("source", source),
           render.kv("patterns", ", ".join(result.patterns))]
    for name in COUNTS:
        out.append(render.kv(name.replace("_", " "), getattr(result.counts, name)))
    if result.file:
        out.append(render.kv("written", f"scenarios/{result.file} ({len(result.ids)} scenarios, "
                                        "set synthetic)"))
    for rejection in result.rejections[:10]:
        out.append(f"    {rejection.reason}: {rejection.detail[:100]}")
    return "\n".join(out) + "\n"


def cmd_synth(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"cluster": args.cluster, "from_eval": args.from_eval,
                              "count": args.count}
    if args.pattern:
        params["pattern"] = args.pattern
    if args.teacher:
        params["teacher"] = args.teacher
    started = call(args, "synth.run", params, SynthStarted)
    if args.no_wait:
        emit_json(started) if args.json else print(f"synth job {started.job_id} started")
        return ExitCode.OK
    job = follow_job(args.socket, started.job_id)
    if job.state != "succeeded" or job.result is None:
        if args.json:
            emit_json(job)
        else:
            message = (job.error or {}).get("message", job.state)
            print(f"  synth job {job.job_id} {job.state}: {message}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    result = msgspec.convert(job.result, SynthResult)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(synth_text(result))
    return ExitCode.OK


def register(sub: Any, add: Any) -> None:
    p = add("synth", cmd_synth, "synthesise scenarios like an eval's failure patterns (verified)")
    p.add_argument("cluster", help="the cluster")
    p.add_argument("--from-eval", dest="from_eval", required=True, metavar="TAG",
                   help="the eval whose failure patterns to learn from")
    p.add_argument("--pattern", metavar="ID", help="only this pattern (see `modelsmith diagnose`)")
    p.add_argument("--count", type=int, default=4, metavar="N", help="candidates per pattern (4)")
    p.add_argument("--teacher", metavar="ENGINE",
                   help="a named engine as teacher (default: the cluster's [synthesis] generator)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is started")
