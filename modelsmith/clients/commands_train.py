"""CLI commands of the train half of the loop: diagnose, train start|status|cancel."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, UsageError, call, emit_json
from modelsmith.clients.watch import follow_job
from modelsmith.rpc.schema.jobs import JobEvent, JobSummary
from modelsmith.rpc.schema.train import Diagnosis, TrainStarted, TrainStatus


def diagnosis_text(d: Diagnosis) -> str:
    out = [render.header(f"Diagnosis of {d.tag}"),
           render.kv("cluster", d.cluster),
           render.kv("failed", f"{d.failed} / {d.scenarios}"),
           render.kv("near misses", d.near_misses)]
    if d.repeats > 1:
        rates = ", ".join(f"{sid} {d.pass_rates.get(sid, 0):.0%}" for sid in d.flaky[:8])
        out.append(render.kv("trials", f"{d.repeats}; failed every trial: {len(d.consistent_failures)}"))
        out.append(render.kv("flaky", f"{len(d.flaky)}" + (f"  ({rates})" if rates else "")))
    out.append("")
    rows = [(p.pattern, p.count, f"{p.lost_score:.2f}", ", ".join(list(p.tags)[:3])) for p in d.patterns]
    out.append(render.table(rows, ["pattern", "count", "lost", "top tags"]))
    for p in d.patterns[:5]:
        out.append(f"  {p.pattern}")
        for ex in p.examples:
            out.append(f"    {ex.scenario_id}: {ex.detail}")
            out.append(f"      response:  {_clip(ex.response)}")
            out.append(f"      reference: {_clip(ex.reference or '')}")
    return "\n".join(out) + "\n"


def _clip(text: str, n: int = 90) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= n else text[: n - 1] + "…"


def cmd_diagnose(args: argparse.Namespace) -> int:
    result = call(args, "diagnose.run", {"cluster": args.cluster, "tag": args.tag}, Diagnosis)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(diagnosis_text(result))
    return ExitCode.OK


def _metric_line(m: dict[str, Any]) -> str:
    def f(key: str) -> str:
        v = m.get(key)
        return "—" if v is None else f"{v:.4g}"

    line = (f"  step {m['step']:>4}  reward {f('reward_mean')} ± {f('reward_std')}  kl {f('kl')}  "
            f"loss {f('loss')}  lr {f('learning_rate')}  len {f('completion_length')}")
    if m.get("judge_failure_share") is not None:  # a rubric with a judge: how often it failed
        line += f"  judge failures {m['judge_failure_share']:.0%}"
    return line


def cmd_train(args: argparse.Namespace) -> int:
    if args.action == "start":
        if not args.cluster or not args.eval_tag:
            raise UsageError("train start needs --cluster and --eval-tag")
        overrides = {k: v for k, v in (("max_steps", args.max_steps), ("learning_rate", args.learning_rate)) if v is not None}
        params: dict[str, Any] = {"cluster": args.cluster, "eval_tag": args.eval_tag, "method": "grpo",
                                  "target": args.target}
        if overrides:
            params["overrides"] = overrides
        started = call(args, "train.start", params, TrainStarted)
        if args.no_wait:
            emit_json(started) if args.json else print(
                f"training job {started.job_id} queued for {started.cluster} "
                f"(iteration {started.iteration}, ~{started.estimated_duration_minutes} min)")
            return ExitCode.OK
        job_id = started.job_id
        if not args.json:
            print(f"  training job {job_id}: {started.scenarios} core scenarios ({args.target}), "
                  f"iteration {started.iteration}, log {started.log}")

        def on_event(event: JobEvent) -> None:
            if event.kind == "metric" and not args.json:
                print(_metric_line(event.data), flush=True)
            elif event.kind == "log" and event.data.get("event") == "stopped" and not args.json:
                print(f"  stopped: {event.data['reason']} at step {event.data['step']} {event.data.get('detail', '')}")

        job = follow_job(args.socket, job_id, on_event=on_event, show_progress=False)
        status = call(args, "train.status", {"job_id": job_id}, TrainStatus)
    else:
        if not args.job_id:
            raise UsageError("train status|cancel needs a JOB_ID")
        if args.action == "cancel":
            result = call(args, "train.cancel", {"job_id": args.job_id}, JobSummary)
            emit_json(result) if args.json else print(f"cancel requested for training job {args.job_id}")
            return ExitCode.OK
        status = call(args, "train.status", {"job_id": args.job_id}, TrainStatus)
        job = status.job
    if args.json:
        emit_json(status)
    else:
        print(render.kv("job", f"{job.job_id}  {job.state}"))
        print(render.kv("progress", f"{job.progress_done}/{job.progress_total}"))
        if status.stop_reason:
            print(render.kv("stopped", status.stop_reason))
        if status.adapter:
            print(render.kv("adapter", status.adapter))
        if status.follow_up_eval:
            print(render.kv("follow-up", f"eval {status.follow_up_eval['tag']} (job {status.follow_up_eval['job_id']})"))
        if job.error:
            print(render.kv("error", job.error["message"]))
    if job.state in ("failed", "cancelled"):
        return ExitCode.JOB_FAILED
    return ExitCode.OK


def register(sub: Any, add: Any) -> None:
    p = add("diagnose", cmd_diagnose, "failure patterns of an eval")
    p.add_argument("tag", help="the eval's tag")
    p.add_argument("--cluster", required=True, help="the cluster the eval belongs to")

    p = add("train", cmd_train, "GRPO post-training on an eval's failures: start | status | cancel")
    p.add_argument("action", choices=["start", "status", "cancel"], help="start a job, or a job's status, or cancel it")
    p.add_argument("job_id", nargs="?", help="status, cancel: the training job")
    p.add_argument("--cluster", help="start: the cluster to train")
    p.add_argument("--eval-tag", dest="eval_tag", help="start: the eval whose failures to train on")
    p.add_argument("--target", choices=["failures", "failures+near_misses", "failures+synthetic"],
                   default="failures",
                   help="start: which core scenarios to train on (default: failures)")
    p.add_argument("--max-steps", type=int, help="start: most optimizer steps (default: cluster.toml's)")
    p.add_argument("--learning-rate", type=float, help="start: learning rate (default: cluster.toml's)")
    p.add_argument("--no-wait", action="store_true", help="start: return the job id at once")
