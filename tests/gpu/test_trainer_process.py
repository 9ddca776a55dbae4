"""Supervising the trainer child: events, cancellation, crashes, the pid file.

Cancellation and crash tests run the real trainer on the tiny model. Tests of the supervisor's
own edge cases (bad lines, a child that ignores SIGTERM, a long stderr) replace the interpreter
with a small shell script: a fake only at the process boundary.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from modelsmith.errors import TrainerError
from modelsmith.examples.tinymodel import warm_start
from modelsmith.gpu.adapters import verify_adapter
from modelsmith.gpu.trainer_process import (
    PID_FILE,
    SPEC_FILE,
    TrainerProcess,
    retrying,
    run_trainer,
)
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    ConvergenceSpec,
    GrpoSpec,
    TrainerCheckpoint,
    TrainerEvent,
    TrainerMetric,
    TrainerStarted,
    TrainerStopped,
    TrainJobSpec,
    decode_spec,
)

RUN_TIMEOUT = 240
T = TypeVar("T")


@pytest.fixture(scope="module")
def yes_no_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("yes-no") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    warm_start(model_dir, [(f"Is campaign {i} live?", a) for i in range(4) for a in ("yes", "no")])
    return model_dir


def make_spec(base_model: Path, root: Path, **changes: Any) -> TrainJobSpec:
    fields: dict[str, Any] = {
        "job_id": "job-7",
        "cluster": "adtech",
        "base_model": str(base_model),
        "output_dir": str(root / "adapters" / "iter-1"),
        "work_dir": str(root / "work"),
        "scenarios": [
            {
                "id": f"live-{i}",
                "set": "core",
                "domain": "adtech",
                "prompt": f"Is campaign {i} live?",
                "rubric": {"criteria": [{"type": "contains", "value": "yes"}]},
            }
            for i in range(4)
        ],
        "grpo": GrpoSpec(
            max_steps=changes.pop("max_steps", 200),
            learning_rate=1e-2,
            num_generations=4,
            per_device_train_batch_size=8,
            max_completion_length=8,
            beta=0.0,
            save_steps=1000,
        ),
        "convergence": ConvergenceSpec(min_steps=10_000),
    }
    fields.update(changes)
    return TrainJobSpec(**fields)


def of_type(events: list[TrainerEvent], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def fake_python(tmp_path: Path, script: str) -> str:
    """An executable that stands in for the interpreter; it ignores its arguments."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The real trainer


async def test_cancelling_the_caller_stops_the_child_which_saves_checkpoint_and_adapter(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(yes_no_model, tmp_path)
    events: list[TrainerEvent] = []

    with anyio.fail_after(RUN_TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def on_event(event: TrainerEvent) -> None:
                events.append(event)
                if isinstance(event, TrainerMetric) and event.step >= 2:
                    tg.cancel_scope.cancel()

            tg.start_soon(lambda: run_trainer(spec, on_event=on_event, log_path=tmp_path / "log"))

    stopped = of_type(events, TrainerStopped)
    assert len(stopped) == 1 and stopped[0].reason == "cancelled"
    assert 2 <= stopped[0].step < 200
    checkpoints = of_type(events, TrainerCheckpoint)
    assert [c.step for c in checkpoints] == [stopped[0].step]
    assert (Path(checkpoints[0].path) / "trainer_state.json").is_file()
    saved = of_type(events, AdapterSaved)
    assert len(saved) == 1
    assert verify_adapter(Path(spec.output_dir)).adapter_sha256 == saved[0].sha256
    assert not (tmp_path / "work" / PID_FILE).exists()


async def test_sigterm_to_the_child_ends_the_run_as_cancelled_with_an_adapter(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(yes_no_model, tmp_path)
    trainer: TrainerProcess

    def on_event(event: TrainerEvent) -> None:
        if isinstance(event, TrainerStarted):
            # What a re-adopting daemon would do: find the child by its pid file.
            pid = int((tmp_path / "work" / PID_FILE).read_text())
            assert pid == trainer.pid
            os.kill(pid, signal.SIGTERM)

    trainer = TrainerProcess(spec=spec, on_event=on_event, log_path=tmp_path / "log")
    with anyio.fail_after(RUN_TIMEOUT):
        outcome = await trainer.run()
    assert outcome.exit_code == 0
    assert outcome.stopped is not None and outcome.stopped.reason == "cancelled"
    assert outcome.adapter is not None and outcome.adapter_path == Path(spec.output_dir)
    assert decode_spec((tmp_path / "work" / SPEC_FILE).read_bytes()) == spec


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_sigkilled_trainer_fails_as_killed_or_with_retries_resumes_from_its_checkpoint(
    yes_no_model: Path, tmp_path: Path, retries: int
) -> None:
    """``[training] retries`` on one box: the child dies of SIGKILL (the OOM killer's signal)
    after its first checkpoint; 0 retries: a TrainerError with reason ``killed``; 1: the job runs
    again with ``resume`` and starts from that checkpoint's step."""
    spec = make_spec(yes_no_model, tmp_path, max_steps=6,
                     grpo=GrpoSpec(max_steps=6, learning_rate=1e-2, num_generations=4,
                                   per_device_train_batch_size=8, max_completion_length=8,
                                   beta=0.0, save_steps=2))
    started: list[TrainerStarted] = []
    checkpoints: list[int] = []
    retried: list[tuple[int, str]] = []

    def on_event(event: TrainerEvent) -> None:
        if isinstance(event, TrainerStarted):
            started.append(event)
        if isinstance(event, TrainerCheckpoint):
            checkpoints.append(event.step)
            if len(started) == 1 and len(checkpoints) == 1:
                os.kill(int((tmp_path / "work" / PID_FILE).read_text()), signal.SIGKILL)

    async def attempt(job: TrainJobSpec) -> Any:
        return await run_trainer(job, on_event=on_event, log_path=tmp_path / "log")

    with anyio.fail_after(RUN_TIMEOUT):
        if retries == 0:
            with pytest.raises(TrainerError) as caught:
                await retrying(spec, retries, attempt)
            assert caught.value.data["reason"] == "killed"
            assert caught.value.data["attempts"] == 1
            assert "SIGKILL" in caught.value.message
            assert len(started) == 1 and not await anyio.Path(spec.output_dir).exists()
            return
        outcome = await retrying(spec, retries, attempt,
                                 on_retry=lambda n, e: retried.append((n, e.data["reason"])))
    assert retried == [(2, "killed")]
    assert [s.resumed_from_step for s in started] == [0, checkpoints[0]]
    assert outcome.stopped is not None and outcome.stopped.step == 6
    assert outcome.adapter is not None
    assert verify_adapter(Path(spec.output_dir)) == outcome.adapter


async def test_a_trainer_that_crashes_raises_trainer_error_with_its_stderr_tail(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    spec = make_spec(broken, tmp_path)
    with anyio.fail_after(RUN_TIMEOUT), pytest.raises(TrainerError) as caught:
        await run_trainer(spec, on_event=lambda event: None, log_path=tmp_path / "log")
    assert caught.value.data["exit_code"] == 1
    tail = caught.value.data["stderr_tail"]
    assert any("Traceback" in line for line in tail)
    assert (tmp_path / "work" / "trainer.stderr.log").stat().st_size > 0


async def test_a_missing_base_model_is_a_bad_spec_with_exit_code_2(tmp_path: Path) -> None:
    spec = make_spec(tmp_path / "nowhere", tmp_path)
    with anyio.fail_after(RUN_TIMEOUT), pytest.raises(TrainerError) as caught:
        await run_trainer(spec, on_event=lambda event: None, log_path=tmp_path / "log")
    assert caught.value.data["exit_code"] == 2
    assert caught.value.data["error"] == "bad_spec"
    assert caught.value.data["stderr_tail"]


# ---------------------------------------------------------------------------------------------
# The supervisor's edge cases, with a stand-in interpreter


async def test_a_line_that_is_not_an_event_is_logged_and_skipped(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        "echo 'Some library printed this'\n"
        'echo \'{"event":"stopped","reason":"non_finite","step":3,"detail":"loss nan"}\'\n'
        "printf 'no newline at the end'\n",
    )
    events: list[TrainerEvent] = []
    spec = make_spec(tmp_path, tmp_path)
    with anyio.fail_after(30):
        outcome = await run_trainer(
            spec, on_event=events.append, log_path=tmp_path / "log", python=python
        )
    assert events == [TrainerStopped(reason="non_finite", step=3, detail="loss nan")]
    assert outcome.bad_lines == 2
    assert outcome.adapter is None
    log_lines = (tmp_path / "log").read_text().splitlines()
    assert log_lines[0] == "Some library printed this" and len(log_lines) == 3


async def test_a_failing_child_reports_only_the_last_fifty_stderr_lines(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        "i=0; while [ $i -lt 80 ]; do echo \"line $i\" >&2; i=$((i+1)); done\n"
        'echo \'{"event":"failed","error":"RuntimeError","detail":"boom"}\'\n'
        "exit 1\n",
    )
    spec = make_spec(tmp_path, tmp_path)
    with anyio.fail_after(30), pytest.raises(TrainerError) as caught:
        await run_trainer(spec, on_event=lambda e: None, log_path=tmp_path / "log", python=python)
    tail = caught.value.data["stderr_tail"]
    assert len(tail) == 50 and tail[-1] == "line 79" and tail[0] == "line 30"
    assert caught.value.data["error"] == "RuntimeError"


async def test_exit_zero_without_a_stopped_event_is_a_trainer_error(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "exit 0\n")
    with anyio.fail_after(30), pytest.raises(TrainerError):
        await run_trainer(
            make_spec(tmp_path, tmp_path), on_event=lambda e: None, log_path=tmp_path / "log",
            python=python,
        )


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    python = fake_python(
        tmp_path,
        "trap '' TERM\n"
        'echo \'{"event":"started","total_steps":1,"resumed_from_step":0,'
        '"device":"cpu","dtype":"float32","trainable_params":1}\'\n'
        "sleep 120\n",
    )
    spec = make_spec(tmp_path, tmp_path)
    trainer: TrainerProcess
    started = anyio.Event()

    def on_event(event: TrainerEvent) -> None:
        started.set()

    trainer = TrainerProcess(
        spec=spec, on_event=on_event, log_path=tmp_path / "log", python=python, cancel_grace=0.5
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(trainer.run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert trainer.pid is not None and pid_is_gone(trainer.pid)
    assert not (tmp_path / "work" / PID_FILE).exists()


async def test_an_exception_in_the_event_handler_stops_the_child_and_propagates(
    tmp_path: Path,
) -> None:
    python = fake_python(
        tmp_path,
        'echo \'{"event":"started","total_steps":1,"resumed_from_step":0,'
        '"device":"cpu","dtype":"float32","trainable_params":1}\'\n'
        "sleep 120\n",
    )
    def on_event(event: TrainerEvent) -> None:
        raise ZeroDivisionError("the daemon's handler broke")

    trainer = TrainerProcess(
        spec=make_spec(tmp_path, tmp_path),
        on_event=on_event,
        log_path=tmp_path / "log",
        python=python,
        cancel_grace=5,
    )
    with anyio.fail_after(30), pytest.raises(ZeroDivisionError):
        await trainer.run()
    assert trainer.pid is not None and pid_is_gone(trainer.pid)
