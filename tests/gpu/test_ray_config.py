"""[ray] in modelsmith.toml: off by default (Ray never imported), errors name file and field;
placement refusals; and the object-store route for artifacts (verified by hash on arrival, all
or nothing). No Ray cluster here: these are fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelsmith.daemon.config import load_daemon_config
from modelsmith.errors import ValidationError
from modelsmith.gpu.ray_artifacts import ArtifactPack, _list_digest, pack, unpack
from modelsmith.gpu.ray_backend import PendingQueue, RayRequest, Unplaceable, check_placeable


def write_config(home: Path, text: str) -> Path:
    (home / "modelsmith.toml").write_text(text, encoding="utf-8")
    return home


def test_ray_is_off_by_default_and_a_daemon_without_it_never_imports_ray(tmp_path: Path) -> None:
    assert not load_daemon_config(None, tmp_path).ray.enabled
    code = (
        "import sys; from pathlib import Path\n"
        "from modelsmith.daemon.app import Daemon\n"
        "from modelsmith.daemon.config import load_daemon_config\n"
        "from modelsmith.gpu.engines import default_engine_factory\n"
        f"home = Path({str(tmp_path)!r})\n"
        "d = Daemon(home=home, socket_path=home / 's', config=load_daemon_config(None, home))\n"
        "assert d.engines._factory is default_engine_factory\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_a_full_ray_section_loads(tmp_path: Path) -> None:
    config = load_daemon_config(None, write_config(tmp_path, """
[ray]
address = "ray://head.internal:10001"
namespace = "fleet-a"
shared_storage = true
[ray.runtime_env]
env_vars = { HF_HOME = "/shared/hf" }
[ray.engine]
num_gpus = 1
pipeline_parallel_size = 2
resources = { gpu_box = 1 }
[ray.trainer]
num_gpus = 2
memory_gb = 64
""")).ray
    assert config.enabled and config.address == "ray://head.internal:10001"
    assert config.runtime_env.as_ray() == {"env_vars": {"HF_HOME": "/shared/hf"}}
    assert config.engine.pipeline_parallel_size == 2 and config.trainer.memory_gb == 64
    for address in ("auto", "10.0.0.5:6379"):
        home = write_config(tmp_path, f'[ray]\naddress = "{address}"\n')
        assert load_daemon_config(None, home).ray.address == address


@pytest.mark.parametrize(("text", "field"), [
    ('[ray]\naddress = "http://head:8265"\n', "ray.address"),
    ('[ray]\naddress = "auto"\nbogus = 1\n', "ray.bogus"),
    ('[ray.engine]\nresources = { CPU = 4 }\n', "ray.engine.resources"),
    ('[ray.engine]\nresources = { gpu_box = -1 }\n', "ray.engine.resources"),
    ('[ray.trainer]\nnum_gpus = -1\n', "ray.trainer.num_gpus"),
    ('[ray.runtime_env]\nenv_vars = { "1BAD" = "x" }\n', "ray.runtime_env.env_vars"),
    ('[ray.runtime_env]\nconda = "env"\n', "ray.runtime_env.conda"),
    ('[ray.trainer]\nretries = 2\n', "ray.trainer"),  # moved to [training] retries
])
def test_a_bad_ray_field_is_named_with_its_file(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load_daemon_config(None, write_config(tmp_path, text))
    assert caught.value.data["field"] == field
    assert caught.value.data["file"] == str(tmp_path / "modelsmith.toml")
    if field == "ray.trainer":
        assert "[training] retries" in caught.value.message


def test_placement_is_refused_naming_the_missing_resource() -> None:
    nodes = [{"node_id": "a", "ip": "10.0.0.1", "resources": {"CPU": 8.0, "memory": 2.0**34}},
             {"node_id": "b", "ip": "10.0.0.2", "resources": {"CPU": 4.0, "GPU": 2.0}}]
    check_placeable(RayRequest("engine e", num_cpus=2, num_gpus=2), nodes)
    with pytest.raises(Unplaceable) as caught:
        check_placeable(RayRequest("engine e", num_cpus=1, num_gpus=4), nodes)
    assert caught.value.data == {"what": "engine e", "resource": "GPU", "requested": 4.0,
                                 "largest": 2.0, "reason": "unplaceable"}
    assert "GPU" in caught.value.message and caught.value.code == 1011
    with pytest.raises(Unplaceable) as caught:
        check_placeable(RayRequest("trainer t", num_cpus=1, num_gpus=1,
                                   memory_bytes=2**33), nodes)
    assert caught.value.data["resource"] == "CPU+GPU+memory"  # each fits a node, not together
    with pytest.raises(Unplaceable) as caught:
        check_placeable(RayRequest("engine e", num_cpus=1, num_gpus=0, spread_gpus=3), nodes)
    assert caught.value.data["resource"] == "GPU"
    with pytest.raises(Unplaceable):
        check_placeable(RayRequest("engine e", num_cpus=1, num_gpus=0), [])


def make_artifact(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "sub" / "weights.safetensors").write_bytes(bytes(range(256)) * 64)
    return root


def test_an_artifact_arrives_whole_and_verified(tmp_path: Path) -> None:
    artifact = pack(make_artifact(tmp_path / "src"))
    dest = unpack(artifact, tmp_path / "out" / "iter-1", expected_digest=artifact.digest)
    assert (dest / "sub" / "weights.safetensors").read_bytes() == bytes(range(256)) * 64
    assert pack(dest).digest == artifact.digest
    with pytest.raises(ValidationError):  # an artifact in place is never overwritten
        unpack(artifact, dest)


@pytest.mark.parametrize("damage", ["byte", "dropped", "digest", "name"])
def test_a_partial_or_altered_transfer_is_never_used(tmp_path: Path, damage: str) -> None:
    artifact = pack(make_artifact(tmp_path / "src"))
    files = dict(artifact.files)
    expected = artifact.digest
    if damage == "byte":
        sha, data = files["sub/weights.safetensors"]
        files["sub/weights.safetensors"] = (sha, data[:-1] + b"\x00")
    elif damage == "dropped":
        del files["sub/weights.safetensors"]
    elif damage == "digest":
        expected = "0" * 64
    else:  # a path that leaves the directory, with a file list digest that matches it
        files["../escape"] = files.pop("adapter_config.json")
        expected = _list_digest([(name, sha, len(data)) for name, (sha, data) in files.items()])
    damaged = ArtifactPack(files=files, digest=artifact.digest if damage != "name" else expected)
    out = tmp_path / "out"
    with pytest.raises(ValidationError):
        unpack(damaged, out / "iter-1", expected_digest=expected)
    assert not (out / "iter-1").exists() and not (tmp_path / "escape").exists()
    assert not out.exists() or not list(out.iterdir())


def test_waiting_jobs_see_their_position_move_up_as_others_are_placed() -> None:
    heard: dict[str, list[int | None]] = {"a": [], "b": [], "c": []}
    queue = PendingQueue()
    for name in "abc":
        queue.add(name, heard[name].append)
    queue.placed("a")
    queue.placed("c")  # c left first (cancelled): b is next
    queue.placed("b")
    assert heard == {"a": [1, None], "b": [2, 1, 1, None], "c": [3, 2, None]}
    assert queue.waiting() == [] and queue.position("a") is None


@pytest.mark.parametrize(("training", "field"), [
    ("num_workers = 0", "training.num_workers"),
    ("num_workers = 257", "training.num_workers"),
    ("retries = -1", "training.retries"),
    ("retries = 11", "training.retries"),
])
def test_training_workers_and_retries_are_bounded_in_cluster_toml(
        tmp_path: Path, training: str, field: str) -> None:
    from modelsmith.loop.cluster.config import load_cluster

    root = tmp_path / "shop"
    root.mkdir()
    (root / "cluster.toml").write_text(f'domain = "adtech"\n[model]\nbase = "m"\n'
                                       f"[training]\n{training}\n")
    with pytest.raises(ValidationError) as caught:
        load_cluster(root)
    assert caught.value.data["field"] == field
    assert caught.value.data["file"] == str(root / "cluster.toml")
    (root / "cluster.toml").write_text('domain = "adtech"\n[model]\nbase = "m"\n'
                                       "[training]\nnum_workers = 4\nretries = 2\n")
    training_section = load_cluster(root).config.training
    assert (training_section.num_workers, training_section.retries) == (4, 2)
    (root / "cluster.toml").write_text('domain = "adtech"\n[model]\nbase = "m"\n')
    training_section = load_cluster(root).config.training
    assert (training_section.num_workers, training_section.retries) == (1, 0)


@pytest.mark.parametrize("name", ["", ".", "..", "../adapters", "a/b", "/etc", "ck\x00pt", "c" * 256])
def test_a_checkpoint_name_from_a_node_must_be_one_plain_path_component(name: str) -> None:
    from modelsmith.gpu.ray_rank import plain_name

    with pytest.raises(ValidationError) as caught:
        plain_name(name)
    assert caught.value.data["field"] == "checkpoint" and len(caught.value.message) < 120
    assert plain_name("checkpoint-12") == "checkpoint-12"
