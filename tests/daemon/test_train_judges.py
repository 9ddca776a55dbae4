"""train.start and judges, through a real daemon: an HTTP judge goes into the trainer's spec (by
the name of its key's variable, never the key); a judge the trainer cannot reach refuses the
job with a typed error naming the scenario, criterion and engine; so is a data-parallel job
(``[training] num_workers`` > 1) on a daemon without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.daemon_process import start_daemon, wait_job
from support.model_server import CLUSTER_TOML, serve_model, write_served_cluster

from modelsmith.errors import Unavailable, ValidationError

JUDGED = """\
scenarios:
  - id: {id}
    set: {set}
    domain: adtech
    prompt: what is CPM for {id}
    rubric:
      criteria:
        - {{type: contains, value: "cost per mille"}}
        - {{type: llm_judge, engine: grader}}
"""

SECRET = "sk-do-not-write-me"


def test_an_http_judge_is_in_the_spec_and_an_unreachable_one_refuses_training(
    short_tmp: Path,
) -> None:
    with serve_model(lambda p, i: "no idea") as cluster_server, \
            serve_model(lambda p, i: "SCORE: 0") as judge_server:
        home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url,
                                    core=JUDGED.format(id="c1", set="core"),
                                    held_out=JUDGED.format(id="h1", set="held-out"))
        http = (f'[engines.grader]\nkind = "openai"\nurl = "{judge_server.url}"\nmodel = "j"\n'
                'api_key_env = "JUDGE_KEY"\n')
        with start_daemon(home, no_engines=False, config_toml=http,
                          env={"JUDGE_KEY": SECRET}) as daemon:
            started = daemon.call("eval.run", {"cluster": "shop", "tag": "base"})
            assert wait_job(daemon, started["jobId"])["state"] == "succeeded"
            assert judge_server.requests  # the eval asked the named judge
            train = daemon.call("train.start", {"cluster": "shop", "eval_tag": "base"})
            job = wait_job(daemon, train["jobId"])  # fails later: the cluster has no real model
            spec_text = (home / "shop" / "train" / train["jobId"] / "spec.json").read_text()
            assert job["state"] == "failed"
        spec = json.loads(spec_text)
        assert spec["judges"]["grader"]["url"] == judge_server.url
        assert spec["judges"]["grader"]["api_key_env"] == "JUDGE_KEY"
        assert SECRET not in spec_text

        local = '[engines.grader]\nkind = "vllm"\nmodel = "models/judge"\n'
        # Engines off: a vLLM judge is only named here, never loaded (nothing to load).
        with start_daemon(home, no_engines=True, config_toml=local) as daemon:
            with pytest.raises(ValidationError) as caught:
                daemon.call("train.start", {"cluster": "shop", "eval_tag": "base"})
            data = caught.value.data
            assert (data["scenario"], data["criterion"], data["engine"]) == ("c1", "llm_judge", "grader")
            assert data["field"] == "rubric.criteria[1].engine"
            assert not list((home / "shop" / "train").glob("*/spec.json"))[1:]  # nothing new
            assert daemon.call("daemon.ping")["version"]


PLAIN = JUDGED.replace("        - {{type: llm_judge, engine: grader}}\n", "")  # no judge


def test_data_parallel_training_without_ray_is_refused_naming_the_field_and_file(
    short_tmp: Path,
) -> None:
    with serve_model(lambda p, i: "no idea") as server:
        toml = CLUSTER_TOML + "\n[training]\nnum_workers = 2\nretries = 1\n"
        home = write_served_cluster(short_tmp / "home", "shop", server.url, cluster_toml=toml,
                                    core=PLAIN.format(id="c1", set="core"),
                                    held_out=PLAIN.format(id="h1", set="held-out"))
        with start_daemon(home, no_engines=False) as daemon:
            started = daemon.call("eval.run", {"cluster": "shop", "tag": "base"})
            assert wait_job(daemon, started["jobId"])["state"] == "succeeded"
            with pytest.raises(Unavailable) as caught:
                daemon.call("train.start", {"cluster": "shop", "eval_tag": "base"})
            assert caught.value.data["field"] == "training.num_workers"
            assert caught.value.data["file"] == str(home / "shop" / "cluster.toml")
            assert "Ray" in caught.value.message
            assert not list((home / "shop" / "train").glob("*/spec.json"))  # no job was made
            assert daemon.call("daemon.ping")["version"]
