"""judge.check through a real daemon against a deterministic local HTTP judge (the process
boundary): agreement figures known in advance, the ledger's judge.checked, judge.list, and a
hostile calibration file refused with file, line and field while the daemon keeps serving."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from support.daemon_process import start_daemon, wait_job
from support.model_server import serve_model, write_served_cluster

from modelsmith.errors import NotFound, ValidationError

SCENARIOS = """\
scenarios:
  - id: {id}
    set: {set}
    domain: adtech
    prompt: what is CPM
    rubric: {{criteria: [{{type: contains, value: "cost per mille"}}]}}
"""

TEMPLATE = "Grade.\\nAnswer: <<{response}>>\\nReply SCORE: 0..{scale}"
# (human score, what the judge will say): the judge reads its score from the answer's text.
EXAMPLES = [(5, "5"), (4, "4"), (3, "2"), (2, "2"), (1, "1"), (0, "1"), (5, "bad"), (0, "0")]


def calibration_yaml(examples: list[tuple[int, str]] = EXAMPLES) -> str:
    lines = [
        "judge:",
        "  engine: grader",
        f'  template: "{TEMPLATE}"',
        "  scale: 5",
        "pass_mark: 0.6",
        "repeats: 3",
        "examples:",
    ]
    for index, (human, said) in enumerate(examples):
        lines += [f"  - id: ex-{index}", "    prompt: what is CPM",
                  f"    response: judge-says-{said}", f"    human_score: {human}",
                  "    labeller: alice"]
    return "\n".join(lines) + "\n"


def deterministic_judge(prompt: str, index: int) -> str:
    said = re.search(r"judge-says-(\w+)", prompt)
    if said is None or not said.group(1).isdigit():
        return "I would rather not say."  # malformed: a judge failure
    return f"Looks fine.\nSCORE: {said.group(1)}"



def test_a_judge_check_reports_known_agreement_and_records_it(short_tmp: Path) -> None:
    with serve_model(lambda p, i: "cost per mille") as cluster_server, \
            serve_model(deterministic_judge) as judge_server:
        home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url,
                                    core=SCENARIOS.format(id="c1", set="core"),
                                    held_out=SCENARIOS.format(id="h1", set="held-out"))
        toml = home / "shop" / "cluster.toml"
        toml.write_text(toml.read_text() + "\n[policy]\nmin_judge_agreement = 0.4\n")
        (home / "shop" / "judges").mkdir()
        (home / "shop" / "judges" / "grader.yaml").write_text(calibration_yaml())
        config = f'[engines.grader]\nkind = "openai"\nurl = "{judge_server.url}"\nmodel = "tiny"\n'
        with start_daemon(home, no_engines=False, config_toml=config) as daemon:
            started = daemon.call("judge.check", {"cluster": "shop"})
            assert started["judges"] == ["grader"]
            job = wait_job(daemon, started["jobId"])
            assert job["state"] == "succeeded", job
            assert len(judge_server.requests) == len(EXAMPLES) * 3

            listed = daemon.call("judge.list", {"cluster": "shop"})["judges"]
            assert len(listed) == 1 and listed[0]["passing"] is True
            check = listed[0]["check"]
            # Worked out by hand: see docs/judges.md for the rules.
            assert check["examples"] == 8 and check["answered"] == 7
            assert check["exact_rate"] == 0.625       # 5 of 8 (the failure is no match)
            assert check["within_one_rate"] == 0.875  # 7 of 8
            assert check["kappa"] == pytest.approx(0.5)  # p_o 0.75, p_e 0.5
            assert check["spearman"] == pytest.approx(26.25 / math.sqrt(27.5 * 27), abs=1e-6)
            low, high = check["kappa_ci95"]
            assert low <= 0.5 <= high
            assert check["consistency_mean_spread"] == 0.0 and check["consistency_agreeing"] == 1.0
            assert check["repeat_failures"] == 3      # the malformed example, every repeat
            assert check["engine"] == "grader" and check["engine_model"] == "tiny"
            assert check["order_bias"] is None  # the template shows one answer: nothing to swap

            ledger = [json.loads(line) for line in
                      (home / "shop" / "ledger.jsonl").read_text().splitlines()]
            entries = [e for e in ledger if e["kind"] == "judge.checked"]
            assert len(entries) == 1 and entries[0]["data"]["identity"] == listed[0]["identity"]
            report = json.loads((home / "shop" / entries[0]["data"]["report"]).read_text())
            assert [e["judge_scores"][0] for e in report["examples"]] == \
                [5.0, 4.0, 2.0, 2.0, 1.0, 1.0, None, 0.0]

            # A changed calibration set is a new identity: the old check no longer counts.
            (home / "shop" / "judges" / "grader.yaml").write_text(calibration_yaml(EXAMPLES[:6]))
            relisted = daemon.call("judge.list", {"cluster": "shop"})["judges"][0]
            assert relisted["identity"] != listed[0]["identity"]
            assert relisted["check"] is None and relisted["passing"] is False


def test_a_hostile_calibration_file_is_refused_naming_where_and_the_daemon_serves_on(
    short_tmp: Path,
) -> None:
    with serve_model(lambda p, i: "cost per mille") as cluster_server:
        home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url,
                                    core=SCENARIOS.format(id="c1", set="core"),
                                    held_out=SCENARIOS.format(id="h1", set="held-out"))
        judges = home / "shop" / "judges"
        judges.mkdir()
        bad = calibration_yaml().replace("    human_score: 3\n", "    human_score: 9\n")
        (judges / "grader.yaml").write_text(bad)
        (judges / "sneaky.yaml").write_text(calibration_yaml().replace(
            f'  template: "{TEMPLATE}"', "  template_file: ../../../etc/passwd"))
        config = '[engines.grader]\nkind = "openai"\nurl = "http://127.0.0.1:9/v1"\nmodel = "t"\n'
        with start_daemon(home, no_engines=False, config_toml=config) as daemon:
            with pytest.raises(ValidationError) as caught:
                daemon.call("judge.check", {"cluster": "shop", "judge": "grader"})
            data = caught.value.data
            assert data["field"] == "examples[2].human_score" and data["line"] == 21
            assert data["file"].endswith("judges/grader.yaml")
            with pytest.raises(ValidationError) as caught:
                daemon.call("judge.check", {"cluster": "shop", "judge": "sneaky"})
            assert caught.value.data["kind"] == "bad_template_file"
            with pytest.raises(NotFound):
                daemon.call("judge.check", {"cluster": "shop", "judge": "nope"})
            listed = daemon.call("judge.list", {"cluster": "shop"})["judges"]
            assert {j["judge"]: j["error"]["code"] for j in listed} == {"grader": 1002,
                                                                        "sneaky": 1002}
            assert daemon.call("daemon.ping")["version"]
