"""The cluster launch files (cluster/) are well-formed, use real rlrestore commands and config keys,
ask for resources the pipeline fits in, and use only fields the KubeRay CRDs and the Ray cluster
launcher accept. No cluster is needed: everything here is static, except that the Slurm script is
run against stub srun/scontrol/ray commands to record what it would do."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rlrestore.config import RunConfig, load_config
from rlrestore.orchestration.cli import build_parser
from rlrestore.runtime.devices import DeviceError, check_run_devices

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
STORAGE = KUBERAY / "storage.yaml"
LAUNCHER = CLUSTER / "aws" / "cluster.yaml"
SLURM = CLUSTER / "slurm" / "rlrestore.sbatch"
DOCKERFILE = CLUSTER / "Dockerfile"
CRD_FIELDS = REPO / "tests" / "data" / "kuberay_crd_fields.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ----------------------------------------------------------------------------- CRD field check
SCALARS = {"string", "integer", "number", "boolean", "any", "quantity", "int-or-string"}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


def crd_schema() -> dict:
    return load_yaml(CRD_FIELDS)


def schema_errors(value, type_expr: str, types: dict, path: str) -> list[str]:
    """Every key path of ``value`` not allowed by ``type_expr`` (vendored CRD grammar), and every
    value of the wrong type."""
    if type_expr == "any":
        return []
    if type_expr.startswith("[]"):
        if not isinstance(value, list):
            return [f"{path}: expected a list ({type_expr}), got {value!r}"]
        return [
            e
            for i, item in enumerate(value)
            for e in schema_errors(item, type_expr[2:], types, f"{path}[{i}]")
        ]
    if type_expr.startswith("map["):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({type_expr}), got {value!r}"]
        inner = type_expr[4:-1]
        return [e for key, item in value.items() for e in schema_errors(item, inner, types, f"{path}.{key}")]
    if type_expr.startswith("enum("):
        allowed = type_expr[5:-1].split(",")
        return [] if value in allowed else [f"{path}: {value!r} is not one of {allowed}"]
    if type_expr in SCALARS:
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "int-or-string": isinstance(value, (int, str)) and not isinstance(value, bool),
            "quantity": (isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(value, str) and bool(QUANTITY.match(value))),
        }[type_expr]
        return [] if ok else [f"{path}: expected {type_expr}, got {value!r}"]
    fields = types[type_expr]
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_expr}), got {value!r}"]
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_expr} (allowed: {', '.join(sorted(fields))})")
        else:
            errors.extend(schema_errors(item, fields[key], types, f"{path}.{key}"))
    return errors


def manifest_errors(document: dict) -> list[str]:
    schema = crd_schema()
    kind = document.get("kind")
    if kind not in schema["roots"]:
        return [f"kind {kind!r} is not a vendored KubeRay kind ({sorted(schema['roots'])})"]
    return schema_errors(document, schema["roots"][kind], schema["types"], kind)


def test_every_cluster_yaml_parses() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml", "storage.yaml", "cluster.yaml"}
    for path in files:
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) and d for d in documents), path


def test_vendored_crd_schema_is_closed() -> None:
    """Every type the vendored schema names is defined in it (a typo there would hide errors)."""
    schema = crd_schema()
    types = schema["types"]
    referenced = set(schema["roots"].values())
    for fields in types.values():
        for expr in fields.values():
            base = re.sub(r"^(\[\])+", "", expr)
            while base.startswith("map["):
                base = re.sub(r"^(\[\])+", "", base[4:-1])
            if base not in SCALARS and not base.startswith("enum("):
                referenced.add(base)
    assert referenced <= set(types), referenced - set(types)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_use_only_crd_fields(path: Path) -> None:
    assert manifest_errors(load_yaml(path)) == []


def test_crd_field_check_catches_typos_and_wrong_types() -> None:
    cluster = load_yaml(RAYCLUSTER)
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    cluster["spec"]["workerGroupSpecs"][1]["rayStartParams"] = {"num-gpus": 4}
    cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = manifest_errors(cluster)
    assert len(errors) == 4, errors
    for fragment in (
        "spec.headGroupSpec.rayStartParam: not a field of HeadGroupSpec",
        "spec.workerGroupSpecs[0].replicas: expected integer",
        "spec.workerGroupSpecs[1].rayStartParams.num-gpus: expected string",
        "spec.workerGroupSpecs[1].template.spec.containers[0].resource: not a field of Container",
    ):
        assert any(fragment in e for e in errors), (fragment, errors)


def test_storage_claim_is_shared_and_mounted_everywhere() -> None:
    claim = load_yaml(STORAGE)
    types = crd_schema()["types"]
    assert claim["kind"] == "PersistentVolumeClaim"
    assert schema_errors(claim["spec"], "PersistentVolumeClaimSpec", types, "spec") == []
    assert schema_errors(claim["metadata"], "ObjectMeta", types, "metadata") == []
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (load_yaml(RAYCLUSTER)["spec"], load_yaml(RAYJOB)["spec"]["rayClusterSpec"]):
        for template in pod_templates(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                      if "persistentVolumeClaim" in v}  # fmt: skip
            assert list(claims.values()) == [claim["metadata"]["name"]]
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert claims.get(mounts.get("/shared")) == claim["metadata"]["name"]
                assert "/dev/shm" in mounts


# ----------------------------------------------------------------------------- KubeRay specifics
def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def test_rayjob_creates_the_same_cluster_as_raycluster() -> None:
    assert load_yaml(RAYJOB)["spec"]["rayClusterSpec"] == load_yaml(RAYCLUSTER)["spec"]


def test_images_and_ray_version_match_pyproject() -> None:
    version = PYPROJECT["project"]["version"]
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    ray_version = ray_pin.split("==")[1]
    for path in (RAYCLUSTER, RAYJOB):
        document = load_yaml(path)
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        assert spec["rayVersion"] == ray_version, path
        images = {c["image"] for t in pod_templates(spec) for c in t["spec"]["containers"]}
        assert images == {f"ghcr.io/<org>/rlrestore:{version}"}, (path, images)


def test_kuberay_secrets_auth_and_private_dashboard() -> None:
    for path in (RAYCLUSTER, RAYJOB):
        document = load_yaml(path)
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        assert spec["authOptions"] == {"mode": "token"}, path
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", path
        assert head.get("enableIngress", False) is False, path
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {
                    "name": "rlrestore-wandb",
                    "key": "api-key",
                }
                for name, entry in env.items():  # no credential is ever written into a manifest
                    if re.search(r"KEY|TOKEN|SECRET|PASSWORD", name):
                        assert "value" not in entry, (path, name)
                assert env["HF_HOME"]["value"].startswith("/shared/")
    # and nothing in any cluster file looks like an inlined credential
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"(api[-_]?key|token)\s*[:=]\s*['\"]?[0-9a-f]{32,}", text, re.IGNORECASE), (
                path
            )


def test_rayjob_runtime_env_and_lifecycle() -> None:
    from ray.runtime_env import RuntimeEnv

    spec = load_yaml(RAYJOB)["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of every runtime_env field
    assert "working_dir" not in runtime_env and "pip" not in runtime_env  # the image holds the code
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


# ----------------------------------------------------------------------------- entrypoints
def dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert workdirs, "cluster/Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/") + "/"


def split_commands(entrypoint: str) -> list[list[str]]:
    """The ``rlrestore ...`` argv lists of a shell entrypoint (commands chained with &&)."""
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    assert all(c and c[0] == "rlrestore" for c in commands), entrypoint
    return [c[1:] for c in commands]


def checkout_paths() -> list[str]:
    """Where the launch paths put this checkout: the image's WORKDIR, the launcher's mount of '.'."""
    launcher_copy = next(
        remote for remote, local in load_yaml(LAUNCHER)["file_mounts"].items() if local == "."
    )
    return [dockerfile_workdir(), launcher_copy.rstrip("/") + "/"]


def local_config_path(path: str) -> Path:
    """Where a config an entrypoint names lives in this checkout."""
    for prefix in checkout_paths():
        if path.startswith(prefix):
            return REPO / path[len(prefix) :]
    return Path(path) if Path(path).is_absolute() else REPO / path


@dataclass
class Command:
    """One ``rlrestore train`` invocation: its stage and the config it resolves to."""

    stage: str
    config_file: str
    overrides: list[str]
    config: RunConfig


def parse_train_command(argv: list[str]) -> Command:
    args = build_parser().parse_args(argv)  # unknown subcommands/stages exit here (SystemExit)
    assert args.command == "train", argv
    config_path = local_config_path(args.config)
    assert config_path.is_file(), f"{args.config} (here {config_path}) does not exist"
    return Command(args.stage, args.config, args.overrides, load_config(config_path, args.overrides))


def rayjob_commands() -> list[Command]:
    return [parse_train_command(argv) for argv in split_commands(load_yaml(RAYJOB)["spec"]["entrypoint"])]


def test_rayjob_entrypoint_runs_the_pipeline_on_shared_storage() -> None:
    commands = rayjob_commands()
    assert [c.stage for c in commands] == ["stage1", "stage2"]
    for command in commands:
        assert command.config.run_dir.startswith("/shared/") and command.config.data.shards.startswith(
            "/shared/"
        )
        assert command.config.ray.address == "auto"
        assert command.config.logging.wandb_mode == "online"
    assert commands[0].config.run_dir == commands[1].config.run_dir


def test_entrypoint_check_rejects_unknown_commands_and_keys() -> None:
    with pytest.raises(SystemExit):
        parse_train_command(["train", "stage3", "configs/prefrestore.yaml"])
    with pytest.raises(ValueError, match="stage2.rollout_worker"):
        parse_train_command(
            ["train", "stage2", "configs/prefrestore.yaml", "stage2.rollout_worker.num_gpus=1"]
        )


# ----------------------------------------------------------------------------- resources
@dataclass
class Node:
    cpu: float
    gpu: float


Bundle = tuple[float, float]  # (CPU, GPU) of one actor / Ray Train worker


def bundles(command: Command) -> tuple[list[Bundle], str]:
    """What the command reserves at once: Ray Train workers (Stage 1) or the Stage 2 placement group."""
    config = command.config
    if command.stage == "stage2":
        stage = config.stage2
        rewards = [resources for resources, _ in stage.reward_actor_groups().values()]
        groups = (stage.resources.rollout, *rewards, stage.resources.learner)
        return [
            (g.num_cpus, g.num_gpus) for g in groups for _ in range(g.num_actors)
        ], stage.resources.placement_strategy
    workers = config.ray.train_workers
    return [(workers.num_cpus, workers.num_gpus)] * workers.num_actors, "PACK"  # Ray Train's default


def fits(wanted: list[Bundle], nodes: list[Node], strategy: str) -> bool:
    """Whether Ray can place every bundle (each bundle on one node), first-fit decreasing."""
    free = [[n.cpu, n.gpu] for n in nodes]
    if strategy == "STRICT_PACK":
        return any(
            sum(b[0] for b in wanted) <= c + 1e-9 and sum(b[1] for b in wanted) <= g + 1e-9 for c, g in free
        )
    used: set[int] = set()
    for cpu, gpu in sorted(wanted, key=lambda b: (b[1], b[0]), reverse=True):
        for index, slot in enumerate(free):
            if strategy == "STRICT_SPREAD" and index in used:
                continue
            if cpu <= slot[0] + 1e-9 and gpu <= slot[1] + 1e-9:
                slot[0] -= cpu
                slot[1] -= gpu
                used.add(index)
                break
        else:
            return False
    return True


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_nodes(spec: dict) -> list[Node]:
    """Ray nodes of a RayClusterSpec: rayStartParams num-cpus/num-gpus, else what KubeRay derives
    from the container limits (cpu rounded up, nvidia.com/gpu)."""

    def node(group: dict) -> Node:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpu = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(cpu_quantity(limits["cpu"]))
        gpu = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
        return Node(cpu, gpu)

    count = "maxReplicas" if spec.get("enableInTreeAutoscaling") else "replicas"
    nodes = [node(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [node(group)] * group[count]
    return nodes


def launcher_nodes(config: dict) -> list[Node]:
    types = config["available_node_types"]
    nodes = []
    for name, node_type in types.items():
        resources = node_type["resources"]
        count = 1 if name == config["head_node_type"] else node_type["max_workers"]
        nodes += [Node(resources.get("CPU", 0), resources.get("GPU", 0))] * count
    assert len(nodes) - 1 <= config["max_workers"]
    return nodes


def sbatch_options() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH\s+--([a-z-]+)=(\S+)", SLURM.read_text(), re.MULTILINE))


def slurm_nodes() -> list[Node]:
    options = sbatch_options()
    return [Node(float(options["cpus-per-task"]), float(options["gpus-per-node"]))] * int(options["nodes"])


def test_pipeline_fits_the_kuberay_cluster() -> None:
    nodes = kuberay_nodes(load_yaml(RAYJOB)["spec"]["rayClusterSpec"])
    assert nodes[0] == Node(0, 0)  # nothing runs on the head but drivers
    for command in rayjob_commands():
        wanted, strategy = bundles(command)
        assert fits(wanted, nodes, strategy), (command.stage, wanted, nodes)
    # every GPU is used by Stage 2 and by Stage 1: the groups are not oversized either
    total_gpus = sum(n.gpu for n in nodes)
    for command in rayjob_commands():
        assert sum(b[1] for b in bundles(command)[0]) == total_gpus, command.stage


def test_pipeline_fits_the_launcher_node_types() -> None:
    nodes = launcher_nodes(load_yaml(LAUNCHER))
    for command in rayjob_commands():
        wanted, strategy = bundles(command)
        assert fits(wanted, nodes, strategy), (command.stage, wanted, nodes)


def test_resource_check_rejects_a_pipeline_too_big_for_the_groups() -> None:
    nodes = kuberay_nodes(load_yaml(RAYJOB)["spec"]["rayClusterSpec"])
    stage2 = next(c for c in rayjob_commands() if c.stage == "stage2")
    for override in (
        "stage2.resources.learner.num_gpus=2",
        "stage2.resources.rollout.num_cpus=20",
        "stage2.resources.rollout.num_actors=5",
    ):
        wanted, strategy = bundles(
            parse_train_command(["train", "stage2", stage2.config_file, *stage2.overrides, override])
        )
        assert not fits(wanted, nodes, strategy), override
    assert not fits([(1, 1)] * 2, [Node(4, 4)], "STRICT_SPREAD")
    assert not fits([(3, 0)] * 2, [Node(4, 0), Node(4, 0)], "STRICT_PACK")


MODEL_REWARDS = {"hpsv2", "clipscore", "pickscore"}


def launch_commands(slurm_run: dict) -> list[Command]:
    return [*rayjob_commands(), *slurm_commands(slurm_run)]


def test_stage2_roles_get_real_gpus_and_pass_the_device_checks(slurm_run: dict) -> None:
    """Rollouts, learners (whole GPUs: an NCCL group) and the model rewards run on GPUs, in
    bf16-mixed, and `rlrestore train` would not refuse any role's device request."""
    for command in launch_commands(slurm_run):
        config = command.config
        assert config.precision == "bf16-mixed", command.stage
        check_run_devices(config, [command.stage])  # what cmd_train runs before Ray starts
        if command.stage != "stage2":
            assert config.ray.train_workers.num_gpus == 1
            continue
        stage = config.stage2
        learner = stage.resources.learner
        assert stage.resources.rollout.num_gpus > 0
        assert learner.num_gpus >= 1 and learner.num_gpus == int(learner.num_gpus)
        groups = stage.reward_actor_groups()
        hosted = {spec.name: name for name, (_, specs) in groups.items() for spec in specs}
        assert MODEL_REWARDS <= set(hosted), hosted
        for reward in MODEL_REWARDS:
            resources, _ = groups[hosted[reward]]
            assert resources.num_gpus > 0, (reward, hosted[reward])
            assert resources.num_gpus <= 1 and (1 / resources.num_gpus).is_integer()  # actors share whole GPUs


def test_device_check_refuses_fractional_learners_idle_gpus_and_cpu_model_rewards() -> None:
    stage2 = next(c for c in rayjob_commands() if c.stage == "stage2")
    for override, key in (
        ("stage2.resources.learner.num_gpus=0.5", "stage2.resources.learner.num_gpus"),
        ("device=cpu", "stage2.resources.rollout.num_gpus"),
    ):
        command = parse_train_command(["train", "stage2", stage2.config_file, *stage2.overrides, override])
        with pytest.raises(DeviceError, match=re.escape(key)):
            check_run_devices(command.config, ["stage2"])
    cpu_rewards = parse_train_command(
        ["train", "stage2", stage2.config_file, *stage2.overrides, "stage2.resources.reward_groups.gpu.num_gpus=0"]
    )
    with pytest.raises(DeviceError, match=r"stage2\.resources\.reward_groups\.gpu\.num_gpus"):
        check_run_devices(cpu_rewards.config.model_copy(update={"device": "cuda"}), ["stage2"])


# ----------------------------------------------------------------------------- cluster launcher
def test_launcher_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(LAUNCHER)
    validate_config(prepare_config(config))  # fills the AWS defaults, then ray-schema.json
    config["available_node_types"]["gpu_worker"]["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


def test_launcher_installs_the_package_with_token_auth_and_a_local_dashboard() -> None:
    config = load_yaml(LAUNCHER)
    assert config["provider"]["type"] in ("aws", "gcp")
    mounts = config["file_mounts"]
    assert mounts["/home/ubuntu/rlrestore"] == "."
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    setup = "\n".join(config["setup_commands"])
    assert "pip install -q ~/rlrestore" in setup and "check_pins.py" in setup
    head = config["head_start_ray_commands"][-1]
    worker = config["worker_start_ray_commands"][-1]
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "ray start --address=$RAY_HEAD_IP:" in worker
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


# ----------------------------------------------------------------------------- Slurm
STUB = """#!{python}
import json, os, stat, sys
name = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
token = os.environ.get("RAY_AUTH_TOKEN_PATH")
record = {{"cmd": name, "argv": argv, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE"),
          "RAY_ADDRESS": os.environ.get("RAY_ADDRESS"), "token_file": token}}
if token and os.path.exists(token):
    record["token_mode"] = stat.S_IMODE(os.stat(token).st_mode)
    record["token_len"] = len(open(token).read())
if name == "python":
    record["stdin"] = sys.stdin.read()
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if name == "scontrol":
    print("gpu-node-1\\ngpu-node-2")
if name == "srun" and "hostname" in argv:
    print("10.1.2.3")
"""


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> dict:
    """Run the sbatch script with stub srun/scontrol (PATH) and ray/python (the venv's bin)."""
    root = tmp_path_factory.mktemp("slurm")
    options = sbatch_options()
    for directory in ("bin", "venv/bin"):
        (root / directory).mkdir(parents=True)
    for stub in ("bin/srun", "bin/scontrol", "venv/bin/ray", "venv/bin/python"):
        (root / stub).write_text(STUB.format(python=sys.executable))
        (root / stub).chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_", "SLURM_", "RLRESTORE_"))
    }
    env.update(
        PATH=f"{root / 'bin'}:/usr/bin:/bin",
        STUB_LOG=str(root / "calls.jsonl"),
        USER="tester",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-node-[1-2]",
        SLURM_JOB_NUM_NODES=options["nodes"],
        SLURM_CPUS_PER_TASK=options["cpus-per-task"],
        SLURM_GPUS_ON_NODE=options["gpus-per-node"],
        SLURM_SUBMIT_DIR=str(REPO),
        RLRESTORE_SHARED=str(root / "shared"),
        RLRESTORE_VENV=str(root / "venv"),
    )
    result = subprocess.run(
        ["bash", str(SLURM)], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    calls = [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]
    return {"result": result, "calls": calls, "root": root}


def test_slurm_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SLURM)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SLURM.read_text()
    for needed in ("srun", "ray start --head", "ray start --block --address", "ray job submit"):
        assert needed in text, needed


def test_slurm_script_starts_head_then_workers_then_submits(slurm_run: dict) -> None:
    result, calls = slurm_run["result"], slurm_run["calls"]
    assert result.returncode == 0, result.stderr
    options = sbatch_options()
    srun_starts = [c for c in calls if c["cmd"] == "srun" and "start" in c["argv"]]
    head, workers = srun_starts[0], srun_starts[1:]
    assert head["argv"][head["argv"].index("-w") + 1] == "gpu-node-1"
    assert "--head" in head["argv"] and "--dashboard-host=127.0.0.1" in head["argv"]
    assert [w["argv"][w["argv"].index("-w") + 1] for w in workers] == ["gpu-node-2"]
    assert all("--address=10.1.2.3:6379" in w["argv"] for w in workers)
    for start in srun_starts:
        assert f"--num-cpus={options['cpus-per-task']}" in start["argv"]
        assert f"--num-gpus={options['gpus-per-node']}" in start["argv"]
        # every Ray process gets token auth, from a private, non-empty per-job token file
        assert start["RAY_AUTH_MODE"] == "token"
        assert start["token_mode"] == 0o600 and start["token_len"] == 64
    order = [c["cmd"] + (" " + c["argv"][0] if c["cmd"] == "ray" else "") for c in calls]
    assert order.index("ray status") < calls.index(workers[0])  # head reachable before workers join
    wait = next(c for c in calls if c["cmd"] == "python")
    assert wait["argv"][1:] == ["10.1.2.3:6379", options["nodes"]] and "ray.nodes()" in wait["stdin"]
    submits = [c for c in calls if c["cmd"] == "ray" and c["argv"][:2] == ["job", "submit"]]
    assert len(submits) == 2 and calls.index(submits[0]) > calls.index(wait)
    assert all(s["RAY_ADDRESS"] == "http://127.0.0.1:8265" and s["RAY_AUTH_MODE"] == "token" for s in submits)
    assert not Path(head["token_file"]).exists()  # removed when the job ends


def slurm_commands(slurm_run: dict) -> list[Command]:
    submits = [
        c["argv"] for c in slurm_run["calls"] if c["cmd"] == "ray" and c["argv"][:2] == ["job", "submit"]
    ]
    return [parse_train_command(argv[argv.index("--") + 2 :]) for argv in submits]


def test_slurm_pipeline_uses_real_keys_shared_storage_and_fits(slurm_run: dict) -> None:
    commands = slurm_commands(slurm_run)
    assert [c.stage for c in commands] == ["stage1", "stage2"]
    shared = str(slurm_run["root"] / "shared")
    for command in commands:
        assert command.config.run_dir.startswith(shared) and command.config.data.shards.startswith(shared)
        assert command.config.ray.address == "auto"
        wanted, strategy = bundles(command)
        assert fits(wanted, slurm_nodes(), strategy), (command.stage, wanted)
    # the same Stage 2 actors as the KubeRay RayJob: one pipeline, several ways to launch it
    stage2_keys = {o for o in commands[1].overrides if o.startswith("stage2.")}
    rayjob_stage2 = next(c for c in rayjob_commands() if c.stage == "stage2")
    assert stage2_keys == {o for o in rayjob_stage2.overrides if o.startswith("stage2.")}
    assert Path(commands[1].config_file).name == Path(rayjob_stage2.config_file).name


# ----------------------------------------------------------------------------- container image
def test_dockerfile_pins_what_pyproject_pins() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]*runtime-ubuntu\d+\.\d+", base), base
    # the Python the image installs satisfies requires-python (">=3.11,<3.12")
    assert "python3.11 -m venv" in text and PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"
    # the dependencies are installed from pyproject.toml's list, the package without re-resolving
    # them, and the pins are verified
    assert 'tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]' in text
    assert "pip install --no-deps /app" in text
    assert "check_pins.py pyproject.toml" in text
    # any version the Dockerfile names itself for a pyproject dependency is the pinned one
    pins = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)$",
            "\n".join(PYPROJECT["project"]["dependencies"]),
            re.MULTILINE,
        )
    )
    for name, version in re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s\"']*)", text):
        if name in pins:
            assert version == pins[name], (name, version)
    # what the image copies is what the build context (Dockerfile.dockerignore) lets through
    allowed = {
        line[1:]
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {src for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for src in line.split()[:-1]}
    assert copied <= allowed, copied - allowed
    assert dockerfile_workdir() == "/app/" and "COPY configs configs" in text


def test_check_pins_passes_here_and_names_a_wrong_pin(tmp_path: Path) -> None:
    script = CLUSTER / "check_pins.py"
    ok = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = tmp_path / "pyproject.toml"
    wrong.write_text(
        '[project]\nname = "rlrestore"\nversion = "' + PYPROJECT["project"]["version"] + '"\n'
        'dependencies = ["pyyaml==0.0.1", "numpy>=1", "not-a-real-dist-xyz==1.0"]\n'
    )
    bad = subprocess.run(
        [sys.executable, str(script), str(wrong)], check=False, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "pyyaml:" in bad.stderr and "pins 0.0.1" in bad.stderr
    assert "not-a-real-dist-xyz: not installed" in bad.stderr and "numpy" not in bad.stderr


# ----------------------------------------------------------------------------- documentation
def documented_commands(path: Path, section: str | None = None) -> list[list[str]]:
    """``rlrestore train`` commands in the fenced code blocks of a markdown file (or one section)."""
    text = path.read_text()
    if section is not None:
        text = text[text.index(section) :]
        following = text.find("\n## ", len(section))
        text = text if following < 0 else text[:following]
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if "rlrestore train" in line:
                commands.append(shlex.split(line[line.index("rlrestore train") :])[1:])
    return commands


@pytest.mark.parametrize(
    ("doc", "section"),
    [(CLUSTER / "README.md", None), (REPO / "README.md", "## Running on a cluster")],
    ids=["cluster", "main"],
)
def test_documented_cluster_commands_are_real(doc: Path, section: str | None) -> None:
    commands = documented_commands(doc, section)
    assert commands, f"no rlrestore train command in {doc}"
    for argv in commands:
        parse_train_command(argv)


def test_cluster_readme_documents_every_file() -> None:
    readme = (CLUSTER / "README.md").read_text()
    for path in sorted(
        p
        for p in CLUSTER.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "README.md"
    ):
        assert str(path.relative_to(CLUSTER)) in readme, path
    assert stat.S_IMODE(SLURM.stat().st_mode) & 0o100, "the sbatch script should be executable"
