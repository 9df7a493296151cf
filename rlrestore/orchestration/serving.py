"""``rlrestore serve-reward``: deploy a reward as a Ray Serve application and serve it until interrupted.

The application (``rewards.serving.reward_application``) answers HTTP requests in the wire
format of the ``http`` reward on ``http://HOST:PORT/<app>`` and deployment-handle calls from the
``serve`` reward of Stage 2 runs on the same Ray cluster. ``serve.*`` sizes it (replicas, their
CPUs and GPUs, batching); ``ray.*`` says which cluster (a local one by default: then only this
command's own clients can reach it by handle, so share a long-lived cluster with ``ray.address``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards import check_reward_args, check_reward_weights, reward_name
from rewards.serving import check_app_name, reward_application
from rlrestore.config import ConfigError, RewardSpec, RunConfig, ServeConfig, parse_override
from rlrestore.orchestration.jobs import ray_session
from rlrestore.runtime.devices import check_role

__all__ = ["ServedReward", "deploy_reward", "serve_reward", "split_arguments", "wait_for_interrupt"]



@dataclass(frozen=True)
class ServedReward:
    """A deployed reward: its application name, the reward's name, its HTTP route and its handle."""

    app: str
    reward: str
    route: str
    handle: Any

    def describe(self, config: ServeConfig) -> list[str]:
        """What the command prints once the application is running."""
        replicas = config.replicas
        sizing = (
            f"{replicas.num_actors} replica(s) of num_cpus={replicas.num_cpus:g} num_gpus={replicas.num_gpus:g}, "
            f"batches of up to {config.max_batch_size} requests (wait {config.batch_wait_timeout_s:g} s)"
        )
        return [
            f"serving reward {self.reward!r}: {sizing}",
            f"application: {self.app}",
            f"route: {self.route} (POST, the wire format of the http reward)",
            f"Stage 2 on this cluster: stage2.rewards: [{{name: serve, args: {{app: {self.app}}}}}]",
            "Ctrl-C (or SIGTERM) stops serving and deletes the application",
        ]


def split_arguments(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(reward args, config overrides) of the ``KEY=VALUE`` items of ``rlrestore serve-reward``.

    A KEY whose first part is a config section or top-level key (``serve.max_batch_size``,
    ``ray.address``, ``device``) overrides the config; any other KEY is a keyword argument of the
    reward (a Python name, so without dots), its VALUE read as YAML.
    """
    sections = set(RunConfig.model_fields)
    reward_args: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items:
        path, value = parse_override(item)
        if path[0] in sections:
            overrides.append(item)
        elif len(path) > 1:
            raise ConfigError(
                f"{item!r}: {path[0]!r} is no config section ({', '.join(sorted(sections))}) and a reward "
                "argument has no dots"
            )
        else:
            reward_args[path[0]] = value
    return reward_args, overrides


def deploy_reward(config: RunConfig, spec: RewardSpec, app: str | None = None, replace: bool = False) -> ServedReward:
    """Start Serve (HTTP proxy on ``serve.host:serve.port``) unless it runs, and deploy the reward of
    ``spec`` as application ``app`` (default: the reward's name) on route ``/<app>``. Needs a Ray
    session. An application of that name already running is refused unless ``replace``."""
    from ray import serve

    name = reward_name(spec)
    app = check_app_name(app or name)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, proxy_location="HeadOnly")
    host, port = _proxy_address(config.serve)
    running = serve.status().applications
    if app in running and not replace:
        raise ValueError(
            f"Serve application {app!r} already runs on this Ray cluster ({running[app].status}); stop the "
            "command serving it, pick another --app, or take it over with --replace"
        )
    application = reward_application(spec, config.serve, device=config.device, precision=config.precision)
    handle = serve.run(application, name=app, route_prefix=f"/{app}")
    return ServedReward(app, name, f"http://{host}:{port}/{app}", handle)


def _proxy_address(config: ServeConfig) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens; ValueError when Serve already ran with another address
    (HTTP options are cluster-wide and fixed when Serve starts)."""
    # Ray pins no public getter of the running proxy's options; the client's is stable in ray 2.60.
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    if (options.host, options.port) != (config.host, config.port):
        raise ValueError(
            f"Serve already runs on this Ray cluster with its HTTP proxy on {options.host}:{options.port}, not "
            f"{config.host}:{config.port} (HTTP options are fixed when Serve starts): use --host {options.host} "
            f"--port {options.port}, or restart Serve (`serve shutdown`)"
        )
    return options.host, options.port


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (a process manager's stop), both raised as KeyboardInterrupt."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_reward(
    config: RunConfig,
    spec: RewardSpec,
    app: str | None = None,
    *,
    replace: bool = False,
    announce: Callable[[str], None] = print,
) -> None:
    """Check the reward, deploy it on the cluster of ``config.ray`` (a local one when unset), announce
    its application and route, serve until interrupted, then delete the application."""
    check_reward_args(spec)
    check_reward_weights([spec])  # before Ray starts: every missing file, with where to get it
    check_role(config.device, "serve replicas", "serve.replicas.num_gpus", config.serve.replicas.num_gpus)
    from ray import serve

    with ray_session(config.ray):
        served = deploy_reward(config, spec, app, replace=replace)
        try:
            for line in served.describe(config.serve):
                announce(line)
            wait_for_interrupt()
        except KeyboardInterrupt:
            announce(f"interrupted: deleting application {served.app!r}")
        finally:
            serve.delete(served.app)
