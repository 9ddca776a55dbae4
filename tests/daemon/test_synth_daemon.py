"""Synthesis through a real daemon: a teacher (a named engine: a scripted local OpenAI-compatible
server at the process boundary) whose replies are a held-out paraphrase, an exact duplicate, a
reference that fails its rubric, malformed text and valid scenarios; the counts in the job and
the ledger say which is which, and only the valid ones reach scenarios/synthetic/. Then the
bundled rtb-pricing generator, and acceptance into core signed with a real SSH key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.daemon_process import start_daemon, wait_job
from support.model_server import ModelServer, serve_model, write_served_cluster
from support.promotion_home import allow_signers, make_reviewer

from modelsmith.errors import NotFound, SignatureError, ValidationError
from modelsmith.examples import rtb_pricing
from modelsmith.loop.records.approval import make_statement
from modelsmith.loop.synth.acceptance import ACCEPT_REQUEST_ID, acceptance_digest

RUBRIC = {"pass_mark": 0.75, "criteria": [{"type": "exact", "weight": 3},
                                          {"type": "length", "max_words": 1, "weight": 1}]}


def _sum(i: int, a: int, b: int) -> dict[str, Any]:
    return {"id": f"c-{i}", "domain": "math", "prompt": f"Add {a} and {b}. Answer with the number only.",
            "reference": str(a + b), "rubric": RUBRIC}


CORE = yaml.safe_dump([_sum(1, 12, 7), _sum(2, 30, 4), _sum(3, 5, 6)])
HELD = yaml.safe_dump([{**_sum(9, 40, 2), "id": "h-1",
                        "prompt": "What is the sum of forty and two? Reply with digits only."}])


def _reply(prompt: str, reference: str, rubric: dict[str, Any] = RUBRIC) -> str:
    return json.dumps({"prompt": prompt, "reference": reference, "rubric": rubric})


# What the teacher answers to "new scenario number N" (the server sees requests in any order).
TEACHER = {
    1: _reply("what is the SUM of forty and two -- reply with digits only!", "42"),  # held-out
    2: _reply("Add 30 and 4. Answer with the number only.", "34"),  # a core prompt copied
    3: _reply("Multiply 6 by 7, then write it in words.", "forty two",
              {**RUBRIC, "pass_mark": 1.0}),  # its reference fails its own length criterion
    4: _reply("A crate holds 9 melons. How many melons are in 3 crates? Number only.", "27"),
    5: _reply("Subtract 15 from 100 and reply with digits alone.", "85"),
    6: "Sure! Here is one: " + _reply("x", "y"),  # prose around the JSON
    7: "no idea",
    8: _reply("What is 2 times 8?", "16", {"criteria": [{"type": "contains", "value": "16"}]}),
}


def _teacher_answer(prompt: str, index: int) -> str:
    number = int(re.search(r"new scenario number (\d+)", prompt)[1])  # type: ignore[index]
    return TEACHER[number]


@pytest.fixture(scope="module")
def cluster_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "7") as server:  # every core answer is wrong
        yield server


@pytest.fixture(scope="module")
def teacher_server() -> Iterator[ModelServer]:
    with serve_model(_teacher_answer) as server:
        yield server



def _ledger(home: Path, cluster: str) -> list[dict[str, Any]]:
    path = home / cluster / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config(url: str) -> str:
    return f'[engines.teacher]\nkind = "openai"\nurl = "{url}"\nmodel = "tiny"\n'


def test_a_teachers_replies_are_verified_and_counted_and_only_valid_ones_are_kept(
    short_tmp: Path, cluster_server: ModelServer, teacher_server: ModelServer
) -> None:
    home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url, core=CORE,
                                held_out=HELD)
    with start_daemon(home, no_engines=False, config_toml=_config(teacher_server.url)) as daemon:
        assert wait_job(daemon, daemon.call("eval.run", {"cluster": "shop", "tag": "e1"})["jobId"])[
            "state"] == "succeeded"
        with pytest.raises(ValidationError):  # no teacher and no [synthesis] generator
            daemon.call("synth.run", {"cluster": "shop", "from_eval": "e1"})
        with pytest.raises(NotFound):
            daemon.call("synth.run", {"cluster": "shop", "from_eval": "e1", "teacher": "nope"})
        with pytest.raises(NotFound):
            daemon.call("synth.run", {"cluster": "shop", "from_eval": "e1", "teacher": "teacher",
                                      "pattern": "no/such"})

        started = daemon.call("synth.run", {"cluster": "shop", "from_eval": "e1",
                                            "teacher": "teacher", "count": 8})
        job = wait_job(daemon, started["jobId"])
        assert job["state"] == "succeeded", job
        result = job["result"]
        assert result["counts"] == {"generated": 8, "dropped_invalid": 3,
                                    "dropped_reference_fails": 1, "dropped_duplicate": 1,
                                    "refused_near_held_out": 1, "kept": 2}
        assert result["teacher"] == "teacher" and result["teacher_model"] == "tiny"
        assert {r["reason"]: r.get("match") for r in result["rejections"]}["near_held_out"] == "h-1"
        # The teacher saw core scenarios only, never the held-out one.
        shown = json.dumps(teacher_server.requests)
        assert "forty and two" not in shown and "Add 12 and 7" in shown

        (finished,) = [e["data"] for e in _ledger(home, "shop") if e["kind"] == "synth.finished"]
        assert {k: finished[k] for k in result["counts"]} == result["counts"]
        assert finished["ids"] == result["ids"] and finished["file"] == result["file"]
        assert len(finished["prompt_sha256"]) == 8
        kept = [json.loads(line) for line in
                (home / "shop" / "scenarios" / result["file"]).read_text().splitlines()]
        assert sorted(s["reference"] for s in kept) == ["27", "85"]
        assert all(s["set"] == "synthetic" for s in kept)

        sets = {s["name"]: s for s in daemon.call("scenarios.list", {"cluster": "shop"})["sets"]}
        assert sets["synthetic"]["count"] == 2 and sets["core"]["count"] == 3
        # The eval before the synth job is still current evidence for the gate.
        before = daemon.call("policy.check", {"cluster": "shop", "eval_tag": "e1"})
        assert {c["check"]: c["passed"] for c in before["checks"]}["scenario_sets"] is True
        listing = daemon.call("synth.list", {"cluster": "shop"})
        provenance = listing["scenarios"][0]["provenance"]
        assert provenance["teacher"] == "teacher" and provenance["teacher_model"] == "tiny"
        assert provenance["pattern"] == result["patterns"][0]
        assert provenance["source_ids"][0] in {"c-1", "c-2", "c-3"}
        # A full eval is core + held-out: the synthetic set is not in its composite.
        assert wait_job(daemon, daemon.call("eval.run", {"cluster": "shop", "tag": "e2"})["jobId"])[
            "state"] == "succeeded"
        summary = daemon.call("eval.summary", {"cluster": "shop", "tag": "e2"})
        assert summary["scored"] == 4 and "synthetic" not in summary["by_set"]
        # Evaluated apart, it is reported and never promotion evidence.
        assert wait_job(daemon, daemon.call("eval.run", {"cluster": "shop", "tag": "syn",
                                                      "type": "synthetic"})["jobId"])[
            "state"] == "succeeded"
        synthetic = daemon.call("eval.summary", {"cluster": "shop", "tag": "syn"})
        assert synthetic["scored"] == 2 and list(synthetic["by_set"]) == ["synthetic"]
        report = daemon.call("policy.check", {"cluster": "shop", "eval_tag": "syn"})
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["eval_full"]["passed"] is False and report["passed"] is False


def test_the_rtb_generator_synthesises_and_a_signed_acceptance_moves_scenarios_into_core(
    short_tmp: Path, cluster_server: ModelServer
) -> None:
    home = short_tmp / "home"
    root = write_served_cluster(home, "bids", cluster_server.url,
                                core=yaml.safe_dump(rtb_pricing.scenarios("core", 6, 0)),
                                held_out=yaml.safe_dump(rtb_pricing.scenarios("held-out", 6, 0,
                                                                              core_count=6)))
    toml = root / "bids" / "cluster.toml"
    toml.write_text(toml.read_text() + '\n[synthesis]\ngenerator = '
                    '"modelsmith.examples.rtb_pricing:synthesise"\n')
    alice = make_reviewer(short_tmp / "keys", "alice")
    allow_signers(home, f"alice {alice.public_line}")
    with start_daemon(home, no_engines=False) as daemon:
        assert wait_job(daemon, daemon.call("eval.run", {"cluster": "bids", "tag": "e1"})["jobId"])[
            "state"] == "succeeded"
        job = wait_job(daemon, daemon.call("synth.run", {"cluster": "bids", "from_eval": "e1",
                                                      "count": 4})["jobId"])
        assert job["state"] == "succeeded", job
        counts = job["result"]["counts"]
        assert counts["generated"] > 0 and counts["kept"] == counts["generated"]
        assert job["result"]["generator"] == "modelsmith.examples.rtb_pricing:synthesise"

        listing = {s["id"]: s for s in daemon.call("synth.list", {"cluster": "bids"})["scenarios"]}
        chosen = sorted(listing)[:2]
        digest = acceptance_digest("bids", [(i, listing[i]["sha256"]) for i in chosen])

        def signed(ids: list[str], digest: str, nonce: str | None = None) -> dict[str, Any]:
            statement = make_statement(cluster="bids", decision="accept", reason="looks right",
                                       request_id=ACCEPT_REQUEST_ID, request_digest=digest,
                                       nonce=nonce)
            return {"cluster": "bids", "ids": ids, "statement": statement.decode(),
                    "signature": alice.sign(statement)}

        with pytest.raises(SignatureError) as caught:  # signed for one scenario, sent for two
            daemon.call("scenarios.accept", signed(chosen, acceptance_digest("bids", [
                (chosen[0], listing[chosen[0]]["sha256"])])))
        assert caught.value.data["reason"] == "digest_mismatch"
        params = signed(chosen, digest)
        accepted = daemon.call("scenarios.accept", params)
        assert accepted["ids"] == chosen and accepted["principal"] == "alice"
        with pytest.raises(NotFound):  # the same statement again: they are core now
            daemon.call("scenarios.accept", params)
        third = sorted(listing)[2]
        with pytest.raises(SignatureError) as caught:  # a new statement reusing the nonce
            daemon.call("scenarios.accept", signed(
                [third], acceptance_digest("bids", [(third, listing[third]["sha256"])]),
                nonce=json.loads(params["statement"])["nonce"]))
        assert caught.value.data["reason"] == "replayed"
        # The CLI: lists, hashes what it shows, signs with the key, sends.
        cli = subprocess.run(
            [sys.executable, "-m", "modelsmith.clients.cli", "scenarios", "accept", "bids", third,
             "--key", str(alice.key_path), "--socket", str(daemon.socket_path), "--json"],
            capture_output=True, text=True, timeout=60, check=False)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["ids"] == [third]
        chosen = sorted([*chosen, third])

        sets = {s["name"]: s for s in daemon.call("scenarios.list", {"cluster": "bids"})["sets"]}
        assert sets["core"]["count"] == 9 and sets["synthetic"]["count"] == len(listing) - 3
        events = [e["data"] for e in _ledger(home, "bids") if e["kind"] == "scenarios.accepted"]
        assert [e["ids"] for e in events] == [[i for i in chosen if i != third], [third]]
        assert events[0]["digest"] == digest
        assert all(e["principal"] == "alice" and e["key_fingerprint"].startswith("SHA256:")
                   for e in events)
        moved = "".join((home / "bids" / "scenarios" / e["file"]).read_text() for e in events)
        assert all(f'"id":"{i}"' in moved and '"set":"core"' in moved for i in chosen)
