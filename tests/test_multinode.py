"""A real 2-node Ray cluster on this machine, run the way an operator runs one: `ray start` with
token authentication and the dashboard on 127.0.0.1, then the tiny Stage 2 submitted with
`ray job submit --working-dir .`. Rollout, reward and learner actors must each run on both nodes.

How the nodes are kept apart from everything else on the machine:
- each node has its own --temp-dir under one short private directory (Ray's socket paths must stay
  under 107 bytes; two nodes sharing a temp dir would also unpack the job's working dir over each
  other), and every port is picked free;
- the auth token is a fresh random file passed with RAY_AUTH_TOKEN_PATH, so ~/.ray is never read
  or written;
- teardown ends exactly the processes whose command line names that private directory, their
  descendants, and this cluster's Ray Client server (never `ray stop`, which would stop every Ray
  on the machine).

The job's driver and workers use this venv's interpreter: the nodes are started with its bin/ first
on PATH, so `rlrestore` and `python` resolve to it on both nodes, and the working dir (the
checkout's sources, 3 MB after .gitignore and the excludes below) is what they import.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlrestore.checkpoints import list_checkpoints, save_checkpoint
from rlrestore.tracking import read_metrics
from tests.conftest import TINY_CONFIG, build_tiny_policy

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ROLES = ("RolloutWorker", "RewardActor", "LearnerActor")
# runtime_env excludes on top of .gitignore (which already drops .venv/, runs/, wandb/, caches)
EXCLUDES = [".git", ".venv", "runs", "wandb", ".pytest_cache", ".ruff_cache", "*.egg-info", "__pycache__"]
# Two steps of the tiny Stage 2 with two actors per role: 6 x 0.25 CPU in a SPREAD placement group
# over two 1-CPU nodes (at most 3 x 0.25 per node). Sharpness only: no pyiqa model to load.
STAGE2 = (
    "logging.progress=false",
    "logging.wandb_mode=disabled",
    "stage2.steps=2",
    "stage2.inputs_per_step=2",
    "stage2.candidates=3",
    "stage2.rollout.batch_size=1",
    "stage2.rollout.sampler_steps=2",
    "stage2.outputs.checkpoint_every=2",
    "stage2.outputs.sample_grid_every=2",
    "stage2.rewards=[{name: sharpness, weight: 1.0}]",
    "stage2.resources.rollout.num_actors=2",
    "stage2.resources.rollout.num_cpus=0.25",
    "stage2.resources.reward.num_actors=2",
    "stage2.resources.reward.num_cpus=0.25",
    "stage2.resources.learner.num_actors=2",
    "stage2.resources.learner.num_cpus=0.25",
    "stage2.resources.placement_strategy=SPREAD",
)
STATE_SCRIPT = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
jobs = {job_id: str(JobSubmissionClient(address).get_job_status(job_id).value) for job_id in sys.argv[2:]}
nodes = [{"node_id": n.node_id, "ip": n.node_ip, "head": n.is_head_node, "state": n.state,
          "resources": n.resources_total} for n in list_nodes(address=address, detail=True)]
actors = [{"class_name": a.class_name, "node_id": a.node_id, "state": a.state}
          for a in list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)]
print(json.dumps({"nodes": nodes, "actors": actors, "jobs": jobs}))
"""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free local port not handed out before in this session: the OS may offer a closed port again
    at once, and Ray refuses to start two of its components on one port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ..., starttime), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def processes_under(is_root: Callable[[str], bool]) -> dict[int, str]:
    """Processes whose command line ``is_root`` accepts, and all their descendants, as
    ``{pid: start time}`` (the start time tells a pid that was reused by another process)."""
    parents, started, matching = {}, {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid, fields = int(entry), proc_stat(int(entry))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields is None:
            continue
        parents[pid], started[pid] = int(fields[1]), fields[19]
        if is_root(cmdline):
            matching.add(pid)
    tree, grew = set(matching), True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return {pid: started[pid] for pid in sorted(tree)}


def running(pid: int, started: str) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` and not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


@dataclass
class TwoNodeCluster:
    root: Path
    env: dict[str, str]
    gcs_address: str
    dashboard: str  # http://127.0.0.1:PORT, the job and state API
    client_server_port: int

    def run(
        self, *args: str, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args], check=False, env={**self.env, **(env or {})}, cwd=self.root,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def ray(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return self.run(VENV_BIN / "ray", *args, timeout=timeout, env=env)

    def state(self, *job_ids: str) -> dict:
        """Nodes and actors (finished ones included) from Ray's state API, and the jobs' status."""
        result = self.run(sys.executable, "-c", STATE_SCRIPT, self.dashboard, *job_ids, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def start_node(self, *args: str) -> None:
        common = (
            "--num-cpus=1", "--object-store-memory=200000000", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        )  # fmt: skip
        result = self.ray("start", *args, *common, timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def processes(self) -> dict[int, str]:
        """This cluster's processes: those naming its private directory, their descendants, and
        the Ray Client server, which `ray start --head` leaves orphaned with neither."""
        client_server = ("ray.util.client.server", f"--port={self.client_server_port} ")
        return processes_under(
            lambda cmdline: str(self.root) in cmdline or all(part in cmdline for part in client_server)
        )

    def stop(self) -> None:
        """End this cluster's processes: SIGTERM, then SIGKILL what is left after a short grace
        (the GCS and raylets take 10 s and more to stop gracefully; nothing here needs that)."""
        processes = self.processes()
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            for pid, started in processes.items():
                if running(pid, started):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(running(*p) for p in processes.items()):
                time.sleep(0.25)


@pytest.fixture(scope="module")
def two_nodes():
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc to find the Ray processes this test starts")
    root = Path(tempfile.mkdtemp(prefix="rlmn-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DASHBOARD_METRIC_PORT=str(free_port()),  # the dashboard's own Prometheus port, 44227 by default
    )
    gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
    cluster = TwoNodeCluster(
        root, env, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", client_port
    )
    try:
        cluster.start_node(
            "--head", f"--port={gcs_port}", f"--temp-dir={root / 'head'}",
            "--include-dashboard=true",  # the job API lives in the dashboard process
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}",
        )  # fmt: skip
        cluster.start_node(
            f"--address={cluster.gcs_address}", f"--temp-dir={root / 'node2'}", '--resources={"node2": 1}'
        )
        deadline = time.monotonic() + 90
        while sum(n["state"] == "ALIVE" for n in cluster.state()["nodes"]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_tiny_stage2_job_runs_every_role_on_both_nodes(two_nodes: TwoNodeCluster) -> None:
    # Token authentication is on: a wrong token is turned away by the job API.
    refused = two_nodes.ray(
        "job", "list", f"--address={two_nodes.dashboard}", env={"RAY_AUTH_TOKEN": "0" * 64}
    )
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr, (
        refused.stdout[-2000:] + refused.stderr[-2000:]
    )

    # Stage 2 starts from a Stage 1 checkpoint (tiny random-init policy, written as Stage 1.2 writes it).
    run_dir = two_nodes.root / "run"
    save_checkpoint(run_dir, "stage1.2", 1, build_tiny_policy(0), {"step": 1}, keep=1)

    submission = f"rlrestore-multinode-{secrets.token_hex(4)}"
    job = two_nodes.ray(
        "job", "submit", f"--address={two_nodes.dashboard}", f"--submission-id={submission}",
        f"--working-dir={REPO}", f"--runtime-env-json={json.dumps({'excludes': EXCLUDES})}",
        "--", "rlrestore", "train", "stage2", str(TINY_CONFIG.relative_to(REPO)),
        f"run_dir={run_dir}", *STAGE2,
        timeout=420,
    )  # fmt: skip
    log = (job.stdout + job.stderr)[-6000:]
    state = two_nodes.state(submission)
    assert state["jobs"][submission] == "SUCCEEDED", log
    assert job.returncode == 0, log

    # The run itself: two steps of metrics and the final checkpoint on the (shared) run directory.
    assert read_metrics(run_dir, "stage2")["step"].tolist() == [0, 1]
    assert [step for step, _ in list_checkpoints(run_dir, "stage2")] == [2]

    # Every role had actors on both nodes (the state API keeps finished actors with their node).
    nodes = {n["node_id"]: n for n in state["nodes"] if n["state"] == "ALIVE"}
    assert len(nodes) == 2 and sum("node2" in n["resources"] for n in nodes.values()) == 1
    for role in ROLES:
        placed = [a["node_id"] for a in state["actors"] if a["class_name"] == role]
        assert len(placed) == 2 and set(placed) == set(nodes), (role, placed, list(nodes))

    # The working dir reached both nodes, small and without the venv, runs or git history.
    for node_dir in ("head", "node2"):
        unpacked = (two_nodes.root / node_dir).glob(
            "session_*/runtime_resources/working_dir_files/_ray_pkg_*"
        )
        packages = [p for p in unpacked if p.is_dir()]
        assert packages, f"no working dir unpacked on {node_dir}"
        for package in packages:
            assert {".venv", ".git", "runs", "wandb"}.isdisjoint(p.name for p in package.iterdir())
            size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
            assert size < 20 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"

    # The dashboard and job API listen on 127.0.0.1 only, not on the address the nodes registered.
    ips = {n["ip"] for n in nodes.values()} - {"127.0.0.1"}
    port = int(two_nodes.dashboard.rsplit(":", 1)[1])
    for ip in ips:
        with socket.socket() as sock, pytest.raises(OSError):
            sock.settimeout(5)
            sock.connect((ip, port))


def test_teardown_finds_only_this_clusters_processes(two_nodes: TwoNodeCluster) -> None:
    """What teardown will end is this cluster: its GCS, both raylets and its Ray Client server."""
    commands = {}
    for pid in two_nodes.processes():
        try:
            commands[pid] = (
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
    assert sum("/gcs_server " in c for c in commands.values()) == 1
    raylets = [c for c in commands.values() if "/raylet " in c]
    assert len(raylets) == 2 and all(str(two_nodes.root) in c for c in raylets)
    assert sum("ray.util.client.server" in c for c in commands.values()) == 1
    assert os.getpid() not in commands and os.getppid() not in commands
