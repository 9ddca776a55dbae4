"""CLI commands for judges: ``judge check CLUSTER [--judge NAME]`` and ``judge list CLUSTER``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, call, emit_json
from modelsmith.clients.watch import follow_job
from modelsmith.rpc.schema.judges import JudgeCheckResult, JudgeCheckStarted, JudgeInfo, JudgeList


def _figure(value: float | None, ci95: Sequence[float] | None = None) -> str:
    if value is None:
        return "undefined"
    interval = f"  [{ci95[0]:.3f}, {ci95[1]:.3f}]" if ci95 else ""
    return f"{value:.3f}{interval}"


def check_block(check: JudgeCheckResult) -> list[str]:
    lines = [
        render.header(f"Judge {check.judge}"),
        render.kv("engine", f"{check.engine} ({check.engine_model})"),
        render.kv("template", check.template_sha256[:12]),
        render.kv("calibration", f"{check.calibration_version[:12]}  ({check.examples} examples, "
                  f"{check.answered} answered, pass at {check.pass_mark:g} of 0..{check.scale:g})"),
        render.kv("exact", _figure(check.exact_rate, check.exact_ci95)),
        render.kv("within one", _figure(check.within_one_rate, check.within_one_ci95)),
        render.kv("kappa", _figure(check.kappa, check.kappa_ci95)),
        render.kv("spearman", _figure(check.spearman, check.spearman_ci95)),
        render.kv("consistency", f"{check.repeats} verdicts each: mean spread "
                  f"{_figure(check.consistency_mean_spread)}, max {_figure(check.consistency_max_spread)}, "
                  f"all agree {_figure(check.consistency_agreeing)}; {check.repeat_failures} failed"),
    ]
    if check.order_bias is not None:
        lines.append(render.kv("order bias", _figure(check.order_bias)))
    if check.report:
        lines.append(render.kv("report", check.report))
    return lines


def info_line(info: JudgeInfo) -> tuple[object, ...]:
    if info.error is not None:
        return (info.judge, info.engine or "—", "—", "—", f"error: {info.error.get('message', '')}"[:80])
    check = info.check
    kappa = _figure(check.kappa) if check else "never checked"
    passing = {True: "pass", False: "FAIL", None: "—"}[info.passing]
    return (info.judge, info.engine or "—", info.examples, kappa, passing)


def cmd_judge(args: argparse.Namespace) -> int:
    if args.action == "list":
        listed = call(args, "judge.list", {"cluster": args.cluster}, JudgeList)
        if args.json:
            emit_json(listed)
        else:
            rows = [info_line(info) for info in listed.judges]
            sys.stdout.write(render.table(rows, ["judge", "engine", "examples", "kappa", "gate"]) + "\n")
        return ExitCode.OK
    params: dict[str, Any] = {"cluster": args.cluster}
    if args.judge:
        params["judge"] = args.judge
    if args.repeats is not None:
        params["repeats"] = args.repeats
    started = call(args, "judge.check", params, JudgeCheckStarted)
    if not args.json:
        print(f"  judge check {started.job_id}: {', '.join(started.judges)}")
    job = follow_job(args.socket, started.job_id)
    if job.state != "succeeded":
        if args.json:
            emit_json(job)
        elif job.error:
            print(render.kv("error", job.error.get("message", "")))
        return ExitCode.JOB_FAILED
    checks = [JudgeCheckResult(**item) for item in (job.result or {}).get("judges", [])]
    if args.json:
        emit_json({"job": job, "checks": checks})
    else:
        for check in checks:
            sys.stdout.write("\n".join(check_block(check)) + "\n")
    return ExitCode.OK


def register(sub: Any, add: Any) -> None:
    p = add("judge", cmd_judge, "judge calibration: check | list")
    p.add_argument("action", choices=["check", "list"],
                   help="check: run judges on their calibration sets; list: their standing")
    p.add_argument("cluster", help="the cluster whose judges/*.yaml to use")
    p.add_argument("--judge", help="check: one calibration set (judges/NAME.yaml); default: all")
    p.add_argument("--repeats", type=int, help="check: verdicts per example (default: the file's)")
