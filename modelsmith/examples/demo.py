"""The quickstart (``make demo``): the whole loop, for real, on a laptop CPU.

What it does, in order, printing the time of each step:

1. Build (once, deterministically, cached under ``.cache/modelsmith-demo/``) a tiny Llama and a
   tokenizer for the bundled ``rtb-pricing`` cluster, pretrain it on prose about the domain
   (knowledge, never the task's question and answer) and give it a short format-only warm start
   (answer with one label), so it knows the facts but answers at chance, as a base model that
   was never asked this question would.
2. Write a fresh home ``.iterate/demo-<time>/`` holding the cluster, and start a real daemon
   subprocess on it (readiness is its systemd ``READY=1``, bounded).
3. Drive the daemon with the real CLI (``modelsmith ...`` subprocesses, output shown): eval
   (below threshold: exit 1), diagnose, GRPO on the failures with live metrics, the follow-up
   eval the train job starts, compare; up to three iterations until the gate passes.
4. ``modelsmith policy check`` and ``modelsmith promote``; the evidence bundle; the exact command
   a human runs to approve with their SSH key.
5. Stop the daemon (SIGTERM, bounded) and print the targets, each honestly marked met or not.

:func:`run_demo` returns a :class:`DemoReport`; the test runs it at reduced size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from modelsmith.errors import DaemonUnreachable, ModelsmithError, Unavailable
from modelsmith.examples import rtb_pricing
from modelsmith.examples.demo_summary import (
    EvalFigures,
    all_targets_met,
    eval_figures,
    paired_line,
    print_summary,
    targets,
)
from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.evals import EvalSummary

__all__ = ["CliRun", "DemoDaemon", "DemoReport", "DemoSettings", "main", "prepare_model",
           "run_demo", "targets"]

CLUSTER = rtb_pricing.CLUSTER
DAEMON_READY_TIMEOUT_S = 120.0
DAEMON_STOP_TIMEOUT_S = 60.0
# A CLI command that runs a job (eval, train) may take minutes on a busy 2-core machine.
CLI_TIMEOUT_S = 900.0
# Every (inventory, region) pair of the example: 4 regions of each inventory type in core, the
# other 2 held out.
DEMO_CORE = 36
DEMO_HELD_OUT = 18
# Held-out scenarios on the three inventory types no core scenario uses (each in every region):
# what the model read about but was never trained to price.
DEMO_UNSEEN_HELD_OUT = 18
# LoRA rank of the demo's adapters (on every linear layer): with 8, one 100-step iteration
# reached only 0.67-0.72 composite (measured); 16 reaches 0.89.
DEMO_LORA_RANK = 16
# Synthetic scenarios per failure pattern in the demo's synth step (the rtb-pricing generator).
DEMO_SYNTH_COUNT = 6


@dataclass(frozen=True)
class DemoSettings:
    """How big a demo to run; the defaults are ``make demo``'s."""

    work_root: Path = field(default_factory=Path.cwd)
    cache_dir: Path | None = None
    home: Path | None = None
    max_iterations: int = 3
    max_steps: int | None = None  # None: the cluster.toml value
    promote: bool = True
    quiet: bool = False


@dataclass
class IterationReport:
    """One loop iteration as the daemon recorded it."""

    number: int
    train_job: str | None = None
    train_state: str | None = None
    train_exit_code: int | None = None
    stop_reason: str | None = None
    adapter: str | None = None
    eval_tag: str | None = None
    composite: float | None = None
    held_out: float | None = None
    gate_passed: bool = False
    held_out_regressions: int | None = None
    figures: EvalFigures | None = None  # with intervals, held-out split by inventory type
    paired_vs_baseline: str | None = None  # eval.compare's paired test, as one line


@dataclass
class DemoReport:
    """What happened, with the numbers the final table is built from."""

    home: Path
    model_dir: Path | None = None
    composite_threshold: float | None = None
    held_out_threshold: float | None = None
    baseline_exit_code: int | None = None
    baseline_composite: float | None = None
    baseline_held_out: float | None = None
    baseline_figures: EvalFigures | None = None
    iterations: list[IterationReport] = field(default_factory=list)
    policy_exit_code: int | None = None
    promote_exit_code: int | None = None
    request_id: str | None = None
    bundle_html: str | None = None
    daemon_exit_code: int | None = None
    # The synth step: the job's counts, and the synthetic set's score (evaluated apart, never
    # in the gate) on the base model and on the final candidate.
    synth_counts: dict[str, int] | None = None
    synthetic_baseline: float | None = None
    synthetic_final: float | None = None
    steps: list[tuple[str, float]] = field(default_factory=list)
    total_seconds: float = 0.0

    @property
    def final(self) -> IterationReport | None:
        return self.iterations[-1] if self.iterations else None


# -- output ----------------------------------------------------------------------------------


class Console:
    """Prints the demo's narration; ``quiet`` keeps only what the test wants to see."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def title(self, text: str) -> None:
        self.say(f"\n=== {text} " + "=" * max(3, 72 - len(text)))


@contextlib.contextmanager
def timed_step(report: DemoReport, console: Console, name: str) -> Iterator[None]:
    """Time one step; its duration is printed and kept for the final table."""
    console.title(name)
    started = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - started
        report.steps.append((name, seconds))
        console.say(f"--- {name}: {seconds:.1f} s")


# -- the model -------------------------------------------------------------------------------


def prepare_model(cache_dir: Path) -> Path:
    """The demo's base model: built, pretrained and warm-started once, then found in the cache.

    The directory is named by a hash of the whole recipe (corpus, model size, pretraining text
    and schedule, warm-start pairs and schedule), so a changed recipe builds a new model instead
    of training an old one twice.
    """
    from transformers.utils import logging as transformers_logging

    from modelsmith.examples.tinymodel import build_tiny_model, pretrain, warm_start

    # The demo prints its own steps; transformers' per-file progress bars are noise here.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    recipe = rtb_pricing.model_recipe()
    corpus = rtb_pricing.corpus()
    digest = hashlib.sha256(json.dumps({**recipe, "corpus": corpus}, sort_keys=True)
                            .encode("utf-8")).hexdigest()
    model_dir = cache_dir / f"rtb-tiny-{digest[:16]}"
    build_tiny_model(model_dir, corpus, **recipe["model"])
    knowledge = recipe["pretrain"]
    pretrain(model_dir, knowledge["texts"], steps=knowledge["steps"], lr=knowledge["lr"],
             batch_size=knowledge["batch_size"], seed=knowledge["seed"])
    warm = recipe["warm_start"]
    pairs = [(prompt, answer) for prompt, answer in warm["pairs"]]
    warm_start(model_dir, pairs, steps=warm["steps"], lr=warm["lr"], seed=warm["seed"])
    return model_dir


# -- the daemon ------------------------------------------------------------------------------


def _engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                 "WATCHDOG_PID", "MODELSMITH_HOME"):
        env.pop(name, None)
    return env


class DemoDaemon:
    """A real ``modelsmith daemon`` child on ``home``, ready when it says ``READY=1``.

    Its log goes to ``home/daemon.log``. :meth:`stop` sends SIGTERM and waits a bounded time
    (then SIGKILL); leaving the ``with`` block stops it.
    """

    def __init__(self, home: Path, socket_path: Path) -> None:
        self.home = home
        self.socket_path = socket_path
        self.log_path = home / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._notify_dir = Path(tempfile.mkdtemp(prefix="ms-notify-", dir="/tmp"))
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(str(self._notify_dir / "notify"))

    def __enter__(self) -> DemoDaemon:
        env = _engine_env()
        env["NOTIFY_SOCKET"] = str(self._notify_dir / "notify")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelsmith.daemon", "--home", str(self.home),
                 "--socket", str(self.socket_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = DAEMON_READY_TIMEOUT_S) -> None:
        """Block until the daemon sends ``READY=1``; it exiting first, or the timeout, raises."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        self._notify.settimeout(0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonUnreachable(
                    f"the daemon exited with code {self.process.returncode} before it was ready; "
                    f"see {self.log_path}", data={"file": str(self.log_path)})
            try:
                datagram = self._notify.recv(65536)
            except TimeoutError:
                continue
            if b"READY=1" in datagram.split(b"\n"):
                return
        raise Unavailable(f"the daemon was not ready within {timeout:.0f} s; see {self.log_path}",
                             data={"file": str(self.log_path)})

    def stop(self, timeout: float = DAEMON_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        try:
            if self.process is None:
                return None
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=30)
            return self.process.returncode
        finally:
            self._notify.close()
            shutil.rmtree(self._notify_dir, ignore_errors=True)


# -- the CLI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    """One ``modelsmith`` command: its exit code and everything it printed."""

    argv: tuple[str, ...]
    exit_code: int
    output: str


def _cli_prefix() -> list[str]:
    entry = Path(sys.executable).with_name("modelsmith")
    if entry.is_file() and os.access(entry, os.X_OK):
        return [str(entry)]
    return [sys.executable, "-m", "modelsmith.clients.cli"]


def run_cli(args: Sequence[str], socket_path: Path, console: Console,
            timeout: float = CLI_TIMEOUT_S) -> CliRun:
    """Run ``modelsmith ARGS`` against the demo daemon, echoing its output live (bounded)."""
    console.say(f"$ modelsmith {' '.join(args)}")
    env = _engine_env()
    env["MODELSMITH_SOCKET"] = str(socket_path)
    process = subprocess.Popen([*_cli_prefix(), *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert process.stdout is not None
    chunks: list[bytes] = []
    pending = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                process.wait(timeout=30)
                raise Unavailable(f"modelsmith {' '.join(args)} ran past {timeout:.0f} s",
                                     data={"argv": list(args)})
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                console.say("  | " + line.decode("utf-8", "replace"))
    if pending:
        console.say("  | " + pending.decode("utf-8", "replace"))
    exit_code = process.wait(timeout=30)
    process.stdout.close()
    console.say(f"  (exit {exit_code})")
    return CliRun(tuple(args), exit_code, b"".join(chunks).decode("utf-8", "replace"))


def _rpc(socket_path: Path, method: str, params: dict[str, Any]) -> Any:
    with RpcClient(socket_path, timeout=60.0) as client:
        return client.call(method, params)


def _latest_train_job(socket_path: Path, seen: set[str]) -> dict[str, Any] | None:
    jobs = _rpc(socket_path, "job.list", {"cluster": CLUSTER})["jobs"]
    fresh = [j for j in jobs if j["kind"] == "train" and j["job_id"] not in seen]
    return max(fresh, key=lambda j: j["created_at"]) if fresh else None


def _wait_job(socket_path: Path, job_id: str) -> dict[str, Any]:
    from modelsmith.clients.watch import follow_job

    # The demo reads every RPC result as built-ins (the shape it prints and records).
    job: dict[str, Any] = msgspec.to_builtins(
        follow_job(socket_path, job_id, timeout=CLI_TIMEOUT_S, show_progress=False))
    return job


# -- the loop --------------------------------------------------------------------------------


def _iterate(number: int, source_tag: str, report: DemoReport, settings: DemoSettings,
             socket_path: Path, console: Console, seen_jobs: set[str]) -> IterationReport:
    """Diagnose ``source_tag``, train on its core set, wait for the follow-up eval, compare."""
    iteration = IterationReport(number=number)
    report.iterations.append(iteration)
    with timed_step(report, console, f"iteration {number}: diagnose {source_tag}"):
        run_cli(["diagnose", source_tag, "--cluster", CLUSTER], socket_path, console)
    with timed_step(report, console, f"iteration {number}: GRPO on the core set of {source_tag}"):
        # Failures and near misses (cluster.toml: near_miss_margin = 1.0, so every core
        # scenario): right answers keep being reinforced while wrong ones are fixed.
        argv = ["train", "start", "--cluster", CLUSTER, "--eval-tag", source_tag,
                "--target", "failures+near_misses"]
        if settings.max_steps is not None:
            argv += ["--max-steps", str(settings.max_steps)]
        train = run_cli(argv, socket_path, console)
        iteration.train_exit_code = train.exit_code
        job = _latest_train_job(socket_path, seen_jobs)
        if job is None:
            return iteration
        seen_jobs.add(job["job_id"])
        status = _rpc(socket_path, "train.status", {"job_id": job["job_id"]})
        iteration.train_job = job["job_id"]
        iteration.train_state = status["job"]["state"]
        iteration.stop_reason = status["stop_reason"]
        iteration.adapter = status["adapter"]
        follow_up = status["follow_up_eval"]
    if not follow_up:
        console.say("  training produced no follow-up eval; the loop stops here")
        return iteration
    with timed_step(report, console, f"iteration {number}: follow-up eval {follow_up['tag']}"):
        from modelsmith.clients.commands_eval import eval_block

        console.say(f"  waiting for eval job {follow_up['job_id']} (started by the train job)")
        eval_job = _wait_job(socket_path, follow_up["job_id"])
        if eval_job["state"] != "succeeded":
            console.say(f"  follow-up eval {eval_job['state']}: {eval_job.get('error')}")
            return iteration
        summary = _rpc(socket_path, "eval.summary", {"cluster": CLUSTER, "tag": follow_up["tag"]})
        console.say(eval_block(msgspec.convert(summary, EvalSummary)).rstrip())
        iteration.eval_tag = follow_up["tag"]
        iteration.composite = summary["composite"]
        iteration.held_out = summary["held_out"]
        iteration.gate_passed = bool(summary["passed"])
        run_cli(["compare", "baseline", follow_up["tag"], "--cluster", CLUSTER], socket_path,
                console)
        comparison = _rpc(socket_path, "eval.compare",
                          {"cluster": CLUSTER, "a": "baseline", "b": follow_up["tag"]})
        iteration.held_out_regressions = sum(
            1 for s in comparison["scenarios"]
            if s["set"] == "held-out" and s["status"] == "regressed")
        iteration.paired_vs_baseline = paired_line(comparison)
        iteration.figures = eval_figures(report.home / CLUSTER / "evals" / follow_up["tag"])
    return iteration


def _promote(report: DemoReport, socket_path: Path, console: Console) -> None:
    gate_tag = report.final.eval_tag if report.final else None
    with timed_step(report, console, "policy check and promotion request"):
        evidence = ["--eval", gate_tag] if gate_tag else []
        policy = run_cli(["policy", "check", CLUSTER, *evidence], socket_path, console)
        report.policy_exit_code = policy.exit_code
        if policy.exit_code != 0 or gate_tag is None:
            console.say("  the gate did not pass: no promotion is requested (nothing is lowered "
                        "to make it pass)")
            return
        promote = run_cli(["promote", CLUSTER, *evidence, "--note", "quickstart demo"],
                          socket_path, console)
        report.promote_exit_code = promote.exit_code
        if promote.exit_code != 0:
            return
        history = _rpc(socket_path, "promote.history", {"cluster": CLUSTER})
        pending = [r for r in history["requests"] if r["status"] == "pending"]
        if not pending:
            return
        report.request_id = pending[-1]["request_id"]
    with timed_step(report, console, "evidence bundle"):
        bundle = run_cli(["bundle", CLUSTER, report.request_id], socket_path, console)
        if bundle.exit_code == 0:
            result = _rpc(socket_path, "bundle.export",
                          {"cluster": CLUSTER, "request_id": report.request_id})
            report.bundle_html = result["html"]


def run_demo(settings: DemoSettings) -> DemoReport:
    """Run the whole quickstart; returns what happened (see the module doc)."""
    console = Console(settings.quiet)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    home = (settings.home or settings.work_root / ".iterate" / f"demo-{stamp}").resolve()
    report = DemoReport(home=home)
    cache_dir = settings.cache_dir or settings.work_root / ".cache" / "modelsmith-demo"

    with timed_step(report, console, "base model: build + pretrain + warm start (cached)"):
        report.model_dir = prepare_model(cache_dir)
        console.say(f"  model: {report.model_dir}")
    with timed_step(report, console, "cluster home"):
        home.mkdir(parents=True, exist_ok=True)
        cluster_root = rtb_pricing.write_cluster(home, report.model_dir, core=DEMO_CORE,
                                                 held_out=DEMO_HELD_OUT,
                                                 lora_rank=DEMO_LORA_RANK,
                                                 unseen_held_out=DEMO_UNSEEN_HELD_OUT)
        from modelsmith.loop.cluster.config import load_cluster

        thresholds = load_cluster(cluster_root).config.thresholds
        report.composite_threshold = thresholds.composite
        report.held_out_threshold = thresholds.held_out
        console.say(f"  home: {home}\n  cluster: {cluster_root} (thresholds: composite "
                    f"{thresholds.composite}, held-out {thresholds.held_out})")

    socket_dir = Path(tempfile.mkdtemp(prefix="ms-demo-", dir="/tmp"))
    socket_path = socket_dir / "modelsmith.sock"
    try:
        daemon = DemoDaemon(home, socket_path)
        with daemon:
            with timed_step(report, console, "start the daemon"):
                console.say(f"$ modelsmith daemon --home {home} --socket {socket_path}  "
                            f"(log: {daemon.log_path})")
                daemon.wait_ready()
                console.say(f"  ready. To follow along in another shell:\n"
                            f"    export MODELSMITH_SOCKET={socket_path}")
                run_cli(["status"], socket_path, console)
            _run_loop(report, settings, socket_path, console)
            with timed_step(report, console, "stop the daemon"):
                report.daemon_exit_code = daemon.stop()
                console.say(f"  daemon exited with code {report.daemon_exit_code}")
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    report.total_seconds = time.monotonic() - started
    print_summary(report, console)
    return report


def _run_loop(report: DemoReport, settings: DemoSettings, socket_path: Path,
              console: Console) -> None:
    with timed_step(report, console, "baseline eval (the base model; the engine loads first)"):
        baseline = run_cli(["eval", "--cluster", CLUSTER, "--tag", "baseline"], socket_path,
                           console)
        report.baseline_exit_code = baseline.exit_code
        summary = _rpc(socket_path, "eval.summary", {"cluster": CLUSTER, "tag": "baseline"})
        report.baseline_composite = summary["composite"]
        report.baseline_held_out = summary["held_out"]
        report.baseline_figures = eval_figures(report.home / CLUSTER / "evals" / "baseline")
    _synth_step(report, socket_path, console)
    source_tag = "baseline"
    seen_jobs: set[str] = set()
    for number in range(1, settings.max_iterations + 1):
        iteration = _iterate(number, source_tag, report, settings, socket_path, console,
                             seen_jobs)
        if iteration.eval_tag is None or iteration.gate_passed:
            break
        source_tag = iteration.eval_tag
    if report.synth_counts and report.synth_counts["kept"] and report.final and report.final.eval_tag:
        with timed_step(report, console, "synthetic set on the final candidate (reported apart)"):
            report.synthetic_final = _synthetic_eval("synthetic-final", socket_path, console)
    if settings.promote:
        _promote(report, socket_path, console)


def _synth_step(report: DemoReport, socket_path: Path, console: Console) -> None:
    """One synth step: scenarios like the baseline's failures from the cluster's generator,
    verified; the synthetic set is then scored on the base model (apart from the gate)."""
    with timed_step(report, console, "synth: new scenarios like the baseline's failures"):
        run_cli(["synth", CLUSTER, "--from-eval", "baseline", "--count", str(DEMO_SYNTH_COUNT)],
                socket_path, console)
        jobs = [j for j in _rpc(socket_path, "job.list", {"cluster": CLUSTER})["jobs"]
                if j["kind"] == "synth" and j["state"] == "succeeded"]
        if not jobs:
            return
        report.synth_counts = dict(max(jobs, key=lambda j: j["created_at"])["result"]["counts"])
        if report.synth_counts["kept"]:
            report.synthetic_baseline = _synthetic_eval("synthetic-baseline", socket_path, console)


def _synthetic_eval(tag: str, socket_path: Path, console: Console) -> float | None:
    run_cli(["eval", "--cluster", CLUSTER, "--type", "synthetic", "--tag", tag], socket_path,
            console)
    summary = _rpc(socket_path, "eval.summary", {"cluster": CLUSTER, "tag": tag})
    composite: float | None = summary["composite"]
    return composite


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modelsmith.examples.demo``: exit 0 when every target is met, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m modelsmith.examples.demo",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, help="state root (default: .iterate/demo-<time>)")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: .cache/modelsmith-demo)")
    parser.add_argument("--iterations", type=int, default=3, help="most loop iterations (3)")
    parser.add_argument("--max-steps", type=int, help="GRPO steps per iteration (cluster.toml's)")
    args = parser.parse_args(argv)
    settings = DemoSettings(home=args.home, cache_dir=args.cache_dir,
                            max_iterations=args.iterations, max_steps=args.max_steps)
    try:
        report = run_demo(settings)
    except ModelsmithError as exc:
        print(f"demo: {exc} [{exc.name} {exc.code}] {exc.data}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if all_targets_met(report) else 1


if __name__ == "__main__":
    sys.exit(main())
