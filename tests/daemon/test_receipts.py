"""The receipts (``eval.report`` / ``modelsmith report``) against two real vLLM OpenAI servers.

Two tiny models (different weights) each behind its own ``vllm.entrypoints.openai.api_server``
process, one under ``--served-model-name alpha``; the cluster's own engine is the second server,
and both servers are named engines of the daemon. An eval on each, then the report: ranked by
composite, the cluster's base model and the named engine on the same server tie (same model,
same greedy sampling), a changed set makes every row stale until it is evaluated again, and a
summary that no longer matches its ledger digest is shown as unverified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.daemon_process import DaemonProcess, start_daemon
from support.model_server import run_eval_job
from support.vllm_server import VllmServer, vllm_serve

from modelsmith.errors import NotFound
from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CLUSTER = rtb_pricing.CLUSTER


@dataclass(frozen=True)
class Servers:
    alpha: VllmServer  # model A, served as "alpha"
    beta: VllmServer  # model B, served under its directory's name; the cluster's own engine
    model_b: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("receipts")
    corpus = rtb_pricing.corpus()
    model_a = build_tiny_model(root / "model-a", corpus, seed=0)
    model_b = build_tiny_model(root / "model-b", corpus, seed=7)
    with vllm_serve(model_a, root, served_name="alpha") as alpha, vllm_serve(model_b, root) as beta:
        yield Servers(alpha=alpha, beta=beta, model_b=model_b)


def _home(root: Path, servers: Servers) -> Path:
    home = root / "home"
    cluster = rtb_pricing.write_cluster(home, servers.model_b, core=6, held_out=3)
    text = (cluster / "cluster.toml").read_text()
    text = text.replace("[engine]\n", f'[engine]\nkind = "openai"\nurl = "{servers.beta.url}"\n')
    (cluster / "cluster.toml").write_text(text)
    return home


def _config(servers: Servers) -> str:
    return f"""\
[engines.alpha]
kind = "openai"
url = "{servers.alpha.url}"
model = "alpha"
usd_per_mtok_in = 0.5
usd_per_mtok_out = 1.5

[engines.beta]
kind = "openai"
url = "{servers.beta.url}"
model = "{servers.beta.model}"
"""


def _eval(daemon: DaemonProcess, **params: Any) -> str:
    job = run_eval_job(daemon, {"cluster": CLUSTER, **params}, timeout_s=300)
    job = job.get("job", job)
    assert job["state"] == "succeeded", job
    return str(job["result"]["tag"])


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["subject"]: row for row in report["rows"]}


def _cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELSMITH_SOCKET": str(daemon.socket_path)}
    return subprocess.run([sys.executable, "-m", "modelsmith.clients.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_receipts_rank_engines_on_the_current_sets_and_mark_stale_ones(
    short_tmp: Path, servers: Servers
) -> None:
    home = _home(short_tmp, servers)
    with start_daemon(home, no_engines=False, config_toml=_config(servers)) as daemon:
        base_tag = _eval(daemon, tag="base-full")
        alpha_tag = _eval(daemon, engine="alpha")
        beta_tag = _eval(daemon, engine="beta")
        _eval(daemon, engine="alpha", quick=True, tag="alpha-quick")  # quick: never a receipt

        report = daemon.call("eval.report", {"cluster": CLUSTER})
        rows = _rows(report)
        assert [r["subject"] for r in report["rows"]] == ["base", "champion", "candidate", "alpha", "beta"]
        assert rows["champion"]["status"] == rows["candidate"]["status"] == "missing"
        for subject, tag in (("base", base_tag), ("alpha", alpha_tag), ("beta", beta_tag)):
            row = rows[subject]
            summary = daemon.call("eval.summary", {"cluster": CLUSTER, "tag": tag})
            assert row["status"] == "current" and row["tag"] == tag
            assert row["composite"] == summary["composite"]
            assert row["held_out"] == summary["held_out"]
            assert row["by_tag"] == {t: g["score"] for t, g in summary["by_tag"].items()}
            assert row["latency_p50_s"] == summary["latency_p50_s"] is not None
            assert 0.0 <= row["pass_rate"] <= 1.0
        assert rows["alpha"]["model"] == "alpha"
        assert rows["alpha"]["cost_per_1k_scenarios_usd"] is not None  # it has prices
        assert rows["beta"]["cost_per_1k_scenarios_usd"] is None  # it has none
        # The cluster's base model and the named engine on the same server answer alike.
        assert rows["base"]["composite"] == rows["beta"]["composite"]
        assert rows["base"]["rank"] == rows["beta"]["rank"]
        # Ranked by composite (then held-out), ties sharing a rank.
        ranked = sorted((r for r in report["rows"] if r["rank"] is not None), key=lambda r: r["rank"])
        assert [r["subject"] for r in ranked if r["status"] == "current"] == [r["subject"] for r in ranked]
        assert ranked[0]["rank"] == 1
        keys = [(r["composite"], r["held_out"]) for r in ranked]
        assert keys == sorted(keys, reverse=True)

        only = daemon.call("eval.report", {"cluster": CLUSTER, "engines": ["alpha"]})
        assert [r["subject"] for r in only["rows"]][3:] == ["alpha"]
        with pytest.raises(NotFound) as unknown:
            daemon.call("eval.report", {"cluster": CLUSTER, "engines": ["gpt-9"]})
        assert unknown.value.data["known"] == ["alpha", "beta"]

        shown = _cli(daemon, "report", CLUSTER)
        assert shown.returncode == 0, shown.stderr
        assert "Modelsmith Receipts" in shown.stdout and "alpha" in shown.stdout
        as_json = _cli(daemon, "report", CLUSTER, "--json", "--engines", "beta")
        assert as_json.returncode == 0, as_json.stderr
        assert [r["subject"] for r in json.loads(as_json.stdout)["rows"]][3:] == ["beta"]

        # A new core scenario: a new set version, and every receipt is stale until rerun.
        core = home / CLUSTER / "scenarios" / "core"
        first = yaml.safe_load(next(core.iterdir()).read_text())["scenarios"][0]
        (core / "extra.yaml").write_text(yaml.safe_dump({"scenarios": [{**first, "id": "extra-1"}]}))
        assert daemon.call("scenarios.verify", {"cluster": CLUSTER})["changed"] == ["core"]
        stale = _rows(daemon.call("eval.report", {"cluster": CLUSTER}))
        assert {stale[s]["status"] for s in ("base", "alpha", "beta")} == {"stale"}
        assert all(stale[s]["rank"] is None for s in ("base", "alpha", "beta"))
        assert stale["alpha"]["composite"] == rows["alpha"]["composite"]  # shown, as it was
        fresh_tag = _eval(daemon, engine="alpha", tag="alpha-2")
        fresh = _rows(daemon.call("eval.report", {"cluster": CLUSTER}))
        assert fresh["alpha"]["status"] == "current" and fresh["alpha"]["tag"] == fresh_tag
        assert fresh["alpha"]["rank"] == 1 and fresh["base"]["status"] == "stale"
        text = _cli(daemon, "report", CLUSTER).stdout
        assert "stale" in text and "older set versions" in text

        # A summary changed after the fact is not shown as a receipt.
        summary_path = home / CLUSTER / "evals" / fresh_tag / "summary.json"
        tampered = json.loads(summary_path.read_text())
        tampered["composite"] = 1.0
        summary_path.write_text(json.dumps(tampered))
        bad = _rows(daemon.call("eval.report", {"cluster": CLUSTER}))["alpha"]
        assert bad["status"] == "unverified" and bad["composite"] is None and bad["rank"] is None
        assert "digest" in bad["note"]
