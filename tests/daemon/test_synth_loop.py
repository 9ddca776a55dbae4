"""``[synthesis] per_iteration`` in the autonomous loop, through a real daemon (OpenAI-compatible
engine on a real ``vllm serve`` of the tiny model, the real trainer child): before it trains, the
loop synthesises with the cluster's generator, and the iteration trains on the failures and those
synthetic scenarios, whose near-duplicate check is in the training manifest's leakage proof."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from support.daemon_process import short_tmp_dir, start_daemon
from support.vllm_server import VllmServer, vllm_serve

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LOOP_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    root = tmp_path_factory.mktemp("served")
    model = build_tiny_model(root / "model", rtb_pricing.corpus())
    with vllm_serve(model, root) as server:
        yield server


def test_the_loop_synthesises_before_training_and_trains_on_the_synthetic_scenarios(
    served: VllmServer,
) -> None:
    with short_tmp_dir() as home:
        root = rtb_pricing.write_cluster(home, Path(served.model), core=8, held_out=4,
                                         max_steps=4, composite=1.0, held_out_threshold=1.0)
        toml = root / "cluster.toml"
        text = toml.read_text().replace("[engine]\n", f'[engine]\nkind = "openai"\nurl = "{served.url}"\n')
        text = text.replace("min_steps = 20", "min_steps = 0").replace("save_steps = 20", "save_steps = 2")
        text = text.replace("[policy]\n", "[policy]\nmax_iterations = 1\n")
        toml.write_text(text.replace("[synthesis]\n", "[synthesis]\nper_iteration = 2\n"))
        with start_daemon(home, no_engines=False) as daemon:
            daemon.call("loop.start", {"cluster": rtb_pricing.CLUSTER})
            deadline = time.monotonic() + LOOP_TIMEOUT_S
            while True:
                status = daemon.call("loop.status", {"cluster": rtb_pricing.CLUSTER})["loops"][0]
                if not status["active"]:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.25)
            assert status["state"] == "idle" and status["run"]["iterations"] == 1, status
        entries = [msgspec.json.decode(line) for line in (root / "ledger.jsonl").read_bytes().splitlines()]
        kinds = [e["kind"] for e in entries]
        assert kinds.index("synth.finished") < kinds.index("train.started")
        (synth,) = [e["data"] for e in entries if e["kind"] == "synth.finished"]
        assert synth["generator"] == "modelsmith.examples.rtb_pricing:synthesise"
        assert synth["kept"] > 0 and synth["refused_near_held_out"] == 0
        manifest = json.loads((root / "adapters" / "iter-1" / "training_manifest.json").read_text())
        trained = {r["id"] for r in manifest["scenarios"]}
        assert set(synth["ids"]) <= trained
        proof = manifest["leakage_check"]
        assert proof["ok"] and proof["near_duplicates_checked"] == synth["kept"]
