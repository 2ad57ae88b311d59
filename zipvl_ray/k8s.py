"""Kubernetes manifests for KubeRay (``ray.io/v1`` RayService), rendered from ``configs/`` and checked offline.

``python -m zipvl_ray.k8s render`` writes ``k8s/*.yaml``: each RayService's ``serveConfigV2`` is the
matching Serve config file (``configs/zipvl-gpu.yaml``, ``configs/zipvl.yaml``) with only the values
a pod needs changed (:data:`POD_SERVE_CONFIG_CHANGES`); the worker group's start size (and the check
that the config fits its pod budget), the pods' grace period, the serving port, the probes and the
model-download Job follow from the same config, so nothing in ``k8s/`` can drift from ``configs/``.

``python -m zipvl_ray.k8s check`` validates every ``k8s/*.yaml``:

* against the KubeRay v1.7.0 CRD OpenAPI schemas (``../shared/kuberay/`` beside the repository, or
  ``--crd-dir``) with unknown fields as errors (kubeconform's strict mode), honouring
  ``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-int-or-string``, list-map keys, and the
  API server's defaulting before ``required`` (:func:`schema_errors`); core kinds (PVC, Job, Secret)
  against the PodTemplateSpec / PersistentVolumeClaimSpec schemas embedded in those CRDs;
* each ``serveConfigV2`` strictly against Ray Serve's config schema (``deployments.schema_check``)
  and the application's ``AppArgs``;
* every import path a config names (app builder, router, autoscaling policy, tracing exporter)
  resolves in this Python, as it must in the image (the head's dashboard imports them);
* the files equal a fresh render.

``python -m zipvl_ray.k8s imports CONFIG...`` runs only the import check (the Dockerfiles run it).
Nothing here imports Ray at module level.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from zipvl_ray.telemetry import EXPORTER_IMPORT_PATH, TelemetrySettings  # no Ray import

#: ``zipvl_ray.api.auth.DEFAULT_API_KEYS_ENV`` (not imported: it would pull in FastAPI).
API_KEYS_ENV = "ZIPVL_API_KEYS"
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the KubeRay CRDs live in this project's workspace (absent in a user's clone).
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay"
KUBERAY_VERSION = "v1.7.0"
RAY_VERSION = "2.60.0"
APP_IMPORT_PATH = "deployments.app:build_app"
#: Top-level packages the images install (``pip install .``): import paths must live in them or in Ray.
IMAGE_PACKAGES = ("zipvl_ray", "deployments", "ray")

#: The serveConfigV2 values the renderer changes, and why; nothing else is touched.
POD_SERVE_CONFIG_CHANGES: tuple[tuple[str, Any, str], ...] = (
    (
        "http_options.host",
        "0.0.0.0",
        "the Serve proxy must accept connections from the <name>-serve-svc Service, not only from inside the pod",
    ),
    (
        "proxy_location",
        "EveryNode",
        "KubeRay labels every worker pod of a RayService for the <name>-serve-svc Service and leaves traffic to "
        "the readiness probe: a worker without a Serve proxy (HeadOnly) would be sent requests it refuses",
    ),
)

#: Tracing of every Ray container, as zipvl_ray.telemetry reads it (Ray 2.60's HTTP proxy, which starts
#: each trace, and the Serve controller see only their node's environment, not a runtime_env): Serve's
#: exporter function is telemetry's, which exports over OTLP when an OTLP endpoint is set ("auto");
#: set ZIPVL_TRACING_EXPORTER to none / console / file to change that. 1% of new traces are sampled;
#: an incoming sampled traceparent is always kept.
TRACING = TelemetrySettings(
    tracing=True,
    exporter="auto",
    sampling_ratio=0.01,
    otlp_endpoint="http://otel-collector.observability.svc.cluster.local:4317",
    otlp_protocol="grpc",
)
TRACING_EXPORTER_IMPORT_PATH = EXPORTER_IMPORT_PATH
#: The environment the renderer puts in every Ray container (the one place to change it). The proxy
#: callback replaces a malformed incoming x-request-id at the Serve proxy (zipvl_ray.api.middleware).
TRACING_ENV: dict[str, str] = {
    **TRACING.env_vars(),
    "OTEL_SERVICE_NAME": TRACING.service_name,
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "zipvl_ray.api.middleware:proxy_middlewares",
}

#: Keys whose values are ``module:attribute`` import paths in a Serve config.
IMPORT_PATH_KEYS = (
    "import_path",
    "request_router_class",
    "policy_function",
    "engine_class",
    "encoder_class",
    "exporter_import_path",
)

METRICS_PORT = 8080
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
GCS_PORT = 6379
CLIENT_PORT = 10001
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S = 20.0


# --------------------------------------------------------------------------------------------------
# What to render
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodShape:
    """Resources of one Ray pod (requests = limits, as KubeRay recommends).

    Attributes
    ----------
    cpus : int
        CPU cores; Ray advertises this many CPUs on a worker (``num-cpus`` from the limit).
    memory_gib : int
        Memory in GiB (object store, model weights while loading, the Ray processes).
    gpus : int
        ``nvidia.com/gpu`` per pod (0 for a CPU pod).
    """

    cpus: int
    memory_gib: int
    gpus: int = 0

    def resources(self) -> dict[str, dict[str, str]]:
        """The container's ``resources`` block."""
        amounts = {"cpu": str(self.cpus), "memory": f"{self.memory_gib}Gi"}
        if self.gpus:
            amounts["nvidia.com/gpu"] = str(self.gpus)
        return {"requests": dict(amounts), "limits": dict(amounts)}


@dataclass(frozen=True)
class ModelCache:
    """Model weights in a Hugging Face cache on a PersistentVolumeClaim, filled once by a Job.

    The Serve config keeps ``HF_HUB_OFFLINE=1``: replicas read the cache and never download. The Job
    downloads the config's hub id with the token from Secret ``token_secret`` (key ``HF_TOKEN``,
    optional for public models); the same optional token is in the Ray pods for configs that do
    download at start-up.
    """

    claim_name: str = "zipvl-model-cache"
    mount_path: str = "/models"
    storage: str = "50Gi"
    access_mode: str = "ReadWriteMany"
    token_secret: str = "hf-token"

    @property
    def hf_home(self) -> str:
        return f"{self.mount_path}/huggingface"


@dataclass(frozen=True)
class Variant:
    """One RayService: which config it serves and the cluster it runs on.

    Attributes
    ----------
    name : str
        ``metadata.name``; the serving Service is ``<name>-serve-svc``.
    config : str
        Serve config file (relative to the repository root) rendered into ``serveConfigV2``.
    output : str
        Manifest written (relative to the repository root).
    image : str
        Image repository (tag: the package version plus ``image_tag_suffix``).
    image_tag_suffix : str
        ``"-gpu"`` for the CUDA image built from ``Dockerfile.gpu``, ``""`` for ``Dockerfile``.
    head : PodShape
        The head pod (``num-cpus: "0"``: no replica is scheduled there).
    worker_group : str
        Name of the (single) worker group.
    worker : PodShape
        One worker pod.
    min_worker_pods, max_worker_pods : int
        The worker group's ``minReplicas`` / ``maxReplicas``: fixed bounds (the pod budget) for the Ray
        autoscaler, not derived from the Serve replica counts, so that a Serve-only change leaves the
        cluster spec alone except ``replicas`` (the start size: the pods that hold every stage at its
        minimum count). KubeRay leaves ``replicas``, ``minReplicas`` and ``maxReplicas`` out of the hash
        it compares, so a change of any of them alone is not applied to a running cluster (no new
        cluster either): docs/kubernetes.md says how to apply a budget change.
    idle_timeout_s : int
        Ray autoscaler: seconds an idle worker pod lives before it is removed.
    upgrade_strategy : str
        ``spec.upgradeStrategy.type``.
    upgrade_reason : str
        Why (written into the manifest's header).
    model_cache : ModelCache, optional
        Weights from a PVC (real checkpoints); None for the built-in models.
    gpu_tolerations : bool
        Tolerate the ``nvidia.com/gpu`` taint that GPU node pools usually carry.
    api_keys_secret : str or None
        Secret whose ``keys`` entry becomes ``ZIPVL_API_KEYS`` in the Ray containers (``optional``: without
        the Secret, no key and no authentication). Create it to turn API keys on; keys never travel
        through the Serve config. None: no such variable.
    """

    name: str
    config: str
    output: str
    image: str
    image_tag_suffix: str
    head: PodShape
    worker_group: str
    worker: PodShape
    min_worker_pods: int
    max_worker_pods: int
    idle_timeout_s: int
    upgrade_strategy: str
    upgrade_reason: str
    model_cache: ModelCache | None = None
    gpu_tolerations: bool = False
    api_keys_secret: str | None = "zipvl-api-keys"


GPU_VARIANT = Variant(
    name="zipvl",
    config="configs/zipvl-gpu.yaml",
    output="k8s/rayservice.yaml",
    image="registry.example.com/zipvl-ray",
    image_tag_suffix="-gpu",
    head=PodShape(cpus=4, memory_gib=16),
    worker_group="gpu",
    worker=PodShape(cpus=8, memory_gib=64, gpus=1),
    min_worker_pods=0,
    max_worker_pods=10,
    idle_timeout_s=600,
    upgrade_strategy="NewCluster",
    upgrade_reason=(
        "NewCluster: a change to rayClusterConfig (image, pod resources, env) starts a second cluster, "
        "switches <name>-serve-svc to it once its applications are RUNNING, and deletes the old one "
        "rayClusterDeletionDelaySeconds later: no refused connection, and the new cluster's pods come on "
        "top of the old one's. It takes all traffic at its floor (LLM initial_replicas): under load, raise "
        "min_replicas first with a serveConfigV2-only change (docs/kubernetes.md, Upgrade). A "
        "serveConfigV2-only change (tau, replica counts, limits) is applied in place and doubles nothing. "
        "If the GPU quota cannot hold both, the new cluster stays pending while the old one keeps serving "
        "(the upgrade stalls, nothing breaks). Alternatives: None (the RayCluster is modified in place, "
        "with a disruption) or NewClusterWithIncrementalUpgrade (alpha: operator feature gate, Gateway "
        "API; the surge is bounded by maxSurgePercent). See docs/kubernetes.md."
    ),
    model_cache=ModelCache(),
    gpu_tolerations=True,
)

CPU_VARIANT = Variant(
    name="zipvl-cpu",
    config="configs/zipvl.yaml",
    output="k8s/rayservice-cpu.yaml",
    image="zipvl-ray",
    image_tag_suffix="",
    head=PodShape(cpus=1, memory_gib=3),
    worker_group="cpu",
    worker=PodShape(cpus=1, memory_gib=3),
    min_worker_pods=1,
    max_worker_pods=2,
    idle_timeout_s=60,
    upgrade_strategy="NewCluster",
    upgrade_reason=(
        "NewCluster: a cluster change starts a second (small) cluster and switches traffic when it is "
        "ready; on a laptop the extra pods for a minute are cheap, and there is no downtime."
    ),
)

VARIANTS: tuple[Variant, ...] = (GPU_VARIANT, CPU_VARIANT)

MODEL_CACHE_PVC_OUTPUT = "k8s/model-cache-pvc.yaml"
MODEL_DOWNLOAD_JOB_OUTPUT = "k8s/model-download-job.yaml"
TOKEN_SECRET_EXAMPLE_OUTPUT = "k8s/hf-token-secret.example.yaml"


def package_version(root: Path = REPO_ROOT) -> str:
    """The package version in ``pyproject.toml`` (the image tag)."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


# --------------------------------------------------------------------------------------------------
# serveConfigV2 and sizing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChange:
    """One value the renderer changed in a Serve config.

    Attributes
    ----------
    path : str
        Dotted key, e.g. ``"http_options.host"``.
    before, after : Any
        The value in ``configs/`` (None: absent) and in the manifest.
    reason : str
        Why a pod needs the change.
    """

    path: str
    before: Any
    after: Any
    reason: str


def pod_serve_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[ConfigChange]]:
    """The config as it must be inside a pod, and what changed (see :data:`POD_SERVE_CONFIG_CHANGES`)."""
    result = copy.deepcopy(config)
    changes = []
    for path, value, reason in POD_SERVE_CONFIG_CHANGES:
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        if node.get(leaf) != value:
            changes.append(ConfigChange(path, node.get(leaf), value, reason))
            node[leaf] = value
    return result, changes


@dataclass(frozen=True)
class StageDemand:
    """Replica bounds and per-replica resources of one Serve deployment (Serve's defaults filled in).

    Attributes
    ----------
    stage : str
        ``"ingress"``, ``"vision"`` or ``"llm"``.
    min_replicas, max_replicas : int
        Equal for a fixed ``num_replicas``; the autoscaling bounds otherwise.
    num_cpus, num_gpus : float
        Reserved per replica.
    graceful_shutdown_timeout_s : float
        How long a stopping replica may take (the pod's grace period must exceed it).
    """

    stage: str
    min_replicas: int
    max_replicas: int
    num_cpus: float
    num_gpus: float
    graceful_shutdown_timeout_s: float


#: Serve deployment name of each stage (``deployments:`` overrides name them).
STAGE_DEPLOYMENTS = {"ingress": "OpenAIIngress", "vision": "VisionEncoder", "llm": "LLMServer"}


def stage_demands(
    app_args: dict[str, Any], overrides: list[dict[str, Any]] | None = None
) -> list[StageDemand]:
    """What the ingress, vision and LLM stages of ``args`` ask of the cluster.

    ``num_replicas`` fixed: min = max = it; ``autoscaling_config``: its bounds; ``"auto"``: Serve's
    default autoscaling bounds updated with the given block. Serve reserves 1 CPU per replica unless
    ``num_cpus`` says otherwise. ``overrides`` (the application's Serve ``deployments:`` list) win over
    ``args`` as Serve 2.60 applies them (``override_deployment_info``): ``autoscaling_config`` replaces
    the whole block, ``num_replicas`` and ``graceful_shutdown_timeout_s`` replace theirs. Overrides that
    Serve would apply differently from what they seem to say are refused (ValueError):

    * ``ray_actor_options``: Serve replaces the whole block the app builds (its GPUs, CPUs and the
      replica environment), so ``{num_gpus: 0.5}`` would also drop the CPUs and the environment; the
      stage's ``args`` fields (``num_cpus``, ``num_gpus``, ``env_vars``) set them;
    * a number of replicas for a stage that autoscales: Serve keeps autoscaling and ignores it;
    * an ``autoscaling_config`` without the ``policy`` the ``args`` block names: Serve would fall back to
      its default queue-length policy.
    """
    from ray.serve.config import AutoscalingConfig

    from deployments.app import AppArgs

    args = AppArgs.model_validate(app_args)
    by_name = {o.get("name"): o for o in overrides or []}
    unknown = sorted(set(by_name) - set(STAGE_DEPLOYMENTS.values()), key=str)
    if unknown:
        raise ValueError(
            f"deployments: no deployment named {unknown} (known: {sorted(STAGE_DEPLOYMENTS.values())})"
        )
    demands = []
    for stage in ("ingress", "vision", "llm"):
        options = getattr(args, stage)
        name = STAGE_DEPLOYMENTS[stage]
        override = by_name.get(name, {})
        if "ray_actor_options" in override:
            raise ValueError(
                f"deployments: {name} overrides ray_actor_options, which Serve takes in place of the whole "
                "block the app builds (GPUs, CPUs and the replica environment, not only the keys given): set "
                f"num_cpus / num_gpus / env_vars under args.{stage} instead"
            )
        update = {
            k: override[k]
            for k in ("num_replicas", "autoscaling_config", "graceful_shutdown_timeout_s")
            if k in override
        }
        autoscales = options.num_replicas == "auto" or options.autoscaling_config is not None
        if update.get("autoscaling_config") is not None:
            policy = (options.autoscaling_config or {}).get("policy")
            if policy is not None and update["autoscaling_config"].get("policy") != policy:
                raise ValueError(
                    f"deployments: {name}'s autoscaling_config replaces the whole block of args.{stage}, whose "
                    f"policy {policy!r} it leaves out or changes: Serve would use another policy; copy the "
                    "policy block into the override"
                )
            autoscales = True
        elif "autoscaling_config" in update:  # null: back to a fixed count
            autoscales = False
        if isinstance(update.get("num_replicas"), int) and autoscales:
            raise ValueError(
                f"deployments: {name} sets num_replicas {update['num_replicas']}, but the stage autoscales and "
                "Serve ignores a fixed count then: override autoscaling_config (min_replicas = max_replicas) "
                "instead"
            )
        if update.get("autoscaling_config") is not None and "num_replicas" not in update:
            update["num_replicas"] = None
        options = options.model_copy(update=update)
        if options.num_replicas == "auto" or options.autoscaling_config is not None:
            block = (
                AutoscalingConfig.default().model_dump(exclude_unset=True)
                if options.num_replicas == "auto"
                else {}
            )
            block.update(options.autoscaling_config or {})
            bounds = AutoscalingConfig.model_validate(block)
            low, high = bounds.min_replicas, bounds.max_replicas
        else:
            low = high = options.num_replicas if options.num_replicas is not None else 1
        demands.append(
            StageDemand(
                stage=stage,
                min_replicas=low,
                max_replicas=high,
                num_cpus=1.0 if options.num_cpus is None else options.num_cpus,
                num_gpus=options.num_gpus or 0.0,
                graceful_shutdown_timeout_s=(
                    options.graceful_shutdown_timeout_s
                    if options.graceful_shutdown_timeout_s is not None
                    else SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S
                ),
            )
        )
    return demands


def worker_pods_needed(demands: Iterable[StageDemand], pod: PodShape, bound: Literal["min", "max"]) -> int:
    """Worker pods that hold every replica at ``bound`` (``"min"`` or ``"max"``) replicas per stage.

    First-fit decreasing over (GPUs, CPUs): an estimate of how Ray packs replicas onto pods. Replicas
    asking for neither CPUs nor GPUs fit anywhere (even on the head) and need no pod.

    Raises
    ------
    ValueError
        When one replica does not fit in one pod.
    """
    replicas = []
    for demand in demands:
        if demand.num_cpus > pod.cpus or demand.num_gpus > pod.gpus:
            raise ValueError(
                f"a {demand.stage} replica needs {demand.num_cpus:g} CPUs and {demand.num_gpus:g} GPUs; "
                f"a worker pod has {pod.cpus} CPUs and {pod.gpus} GPUs"
            )
        count = demand.min_replicas if bound == "min" else demand.max_replicas
        if demand.num_cpus or demand.num_gpus:
            replicas += [(demand.num_gpus, demand.num_cpus)] * count
    free: list[list[float]] = []
    for gpus, cpus in sorted(replicas, reverse=True):
        for room in free:
            if room[0] >= gpus - 1e-9 and room[1] >= cpus - 1e-9:
                room[0] -= gpus
                room[1] -= cpus
                break
        else:
            free.append([pod.gpus - gpus, pod.cpus - cpus])
    return len(free)


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


def _wget_health(port: int, path: str) -> str:
    # The same command KubeRay injects when a pod has no probe of its own.
    return f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/{path} | grep success"


def _exec_probe(commands: list[str], *, initial_delay_s: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "exec": {"command": ["bash", "-c", " && ".join(commands)]},
        "initialDelaySeconds": initial_delay_s,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "successThreshold": 1,
        "failureThreshold": failure_threshold,
    }


def probes(node: str, *, serve_port: int, proxy_on_workers: bool) -> dict[str, dict[str, Any]]:
    """Readiness and liveness probes of a Ray container (KubeRay's own checks, made explicit).

    Head: raylet and GCS healthy. Worker: raylet healthy; readiness also asks the pod's Serve proxy
    (``/-/healthz``) when proxies run on every node, so the serving Service only sends traffic to
    pods that can route it. Liveness is patient (10 minutes): a busy raylet is not a dead one.
    """
    raylet = _wget_health(DASHBOARD_AGENT_PORT, "api/local_raylet_healthz")
    if node == "head":
        alive = ready = [raylet, _wget_health(DASHBOARD_PORT, "api/gcs_healthz")]
        ready_failures = 10
    else:
        alive = [raylet]
        ready = [raylet, _wget_health(serve_port, "-/healthz")] if proxy_on_workers else [raylet]
        ready_failures = 1 if proxy_on_workers else 10
    return {
        "readinessProbe": _exec_probe(ready, initial_delay_s=10, failure_threshold=ready_failures),
        "livenessProbe": _exec_probe(alive, initial_delay_s=30, failure_threshold=120),
    }


def _env(variant: Variant) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in TRACING_ENV.items()]
    cache = variant.model_cache
    if cache is not None:
        env.append({"name": "HF_HOME", "value": cache.hf_home})
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": cache.token_secret, "key": "HF_TOKEN", "optional": True}
                },
            }
        )
    if variant.api_keys_secret:
        env.append(
            {
                "name": API_KEYS_ENV,
                "valueFrom": {
                    "secretKeyRef": {"name": variant.api_keys_secret, "key": "keys", "optional": True}
                },
            }
        )
    return env


def _pod_template(
    variant: Variant,
    *,
    node: str,
    image: str,
    shape: PodShape,
    serve_port: int,
    proxy_on_workers: bool,
    grace_period_s: int | None,
) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    if node == "head":
        ports = [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": CLIENT_PORT},
            {"name": "serve", "containerPort": serve_port},
            *ports,
        ]
    elif proxy_on_workers:
        ports = [{"name": "serve", "containerPort": serve_port}, *ports]
    container: dict[str, Any] = {
        "name": f"ray-{node}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "env": _env(variant),
        "resources": shape.resources(),
        **probes(node, serve_port=serve_port, proxy_on_workers=proxy_on_workers),
    }
    spec: dict[str, Any] = {"containers": [container]}
    cache = variant.model_cache
    if cache is not None:
        container["volumeMounts"] = [{"name": "model-cache", "mountPath": cache.mount_path}]
        spec["volumes"] = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}]
    if shape.gpus and variant.gpu_tolerations:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if grace_period_s is not None:
        spec["terminationGracePeriodSeconds"] = grace_period_s
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "zipvl-ray", "app.kubernetes.io/instance": variant.name},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)},
        },
        "spec": spec,
    }


@dataclass
class Rendered:
    """One rendered RayService and the facts its header states.

    Attributes
    ----------
    variant : Variant
    manifest : dict
        The RayService object.
    changes : list[ConfigChange]
        What differs between its ``serveConfigV2`` and the config file.
    demands : list[StageDemand]
        What the stages ask of the cluster.
    start_pods, max_pods_needed : int
        Worker pods holding every stage at its minimum / maximum replica count.
    notes : list[str]
        Lines of the manifest's header comment.
    """

    variant: Variant
    manifest: dict[str, Any]
    changes: list[ConfigChange]
    demands: list[StageDemand]
    start_pods: int
    max_pods_needed: int
    notes: list[str] = field(default_factory=list)


def _the_app(config: dict[str, Any], source: str) -> dict[str, Any]:
    apps = config.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != APP_IMPORT_PATH:
        raise ValueError(f"{source}: expected one application with import_path {APP_IMPORT_PATH}")
    return apps[0]


def render_rayservice(variant: Variant, root: Path = REPO_ROOT, image_repo: str | None = None) -> Rendered:
    """The RayService of ``variant`` from its Serve config file."""
    source = yaml.safe_load((root / variant.config).read_text())
    app = _the_app(source, variant.config)
    serve_config, changes = pod_serve_config(source)
    http = serve_config["http_options"]
    serve_port = int(http.get("port", 8000))
    proxy_on_workers = serve_config.get("proxy_location", "EveryNode") == "EveryNode"
    # A `deployments:` list resizes without changing the app's code version (no rolling restart of every
    # replica, unlike a change under args): the worker group is sized from args with it applied.
    demands = stage_demands(app.get("args") or {}, app.get("deployments"))
    if any(d.num_gpus for d in demands) and not variant.worker.gpus:
        raise ValueError(f"{variant.config} asks for GPUs but the {variant.name} worker pods have none")
    start_pods = max(variant.min_worker_pods, worker_pods_needed(demands, variant.worker, "min"))
    max_pods_needed = worker_pods_needed(demands, variant.worker, "max")
    if max(start_pods, max_pods_needed) > variant.max_worker_pods:
        raise ValueError(
            f"{variant.config} needs up to {max(start_pods, max_pods_needed)} worker pods at its maximum replica "
            f"counts; the {variant.name} worker group allows {variant.max_worker_pods} "
            "(raise max_worker_pods in zipvl_ray/k8s.py if the budget allows)"
        )
    grace_s = int(math.ceil(max(d.graceful_shutdown_timeout_s for d in demands))) + 30
    image = f"{image_repo or variant.image}:{package_version(root)}{variant.image_tag_suffix}"
    deletion_delay_s = int(http.get("request_timeout_s") or 60)
    templates = dict(image=image, serve_port=serve_port, proxy_on_workers=proxy_on_workers)

    header = [f"Rendered from {variant.config} by `python -m zipvl_ray.k8s render`: do not edit here."]
    if changes:
        header += [f"Changed for pods: {c.path} {c.before!r} -> {c.after!r}: {c.reason}." for c in changes]
    else:
        header.append("Changed for pods: nothing (the file is pod-ready as it is).")
    serve_text = to_yaml(serve_config, header)

    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": variant.name,
            "labels": {"app.kubernetes.io/name": "zipvl-ray", "app.kubernetes.io/instance": variant.name},
        },
        "spec": {
            "upgradeStrategy": {"type": variant.upgrade_strategy},
            "rayClusterDeletionDelaySeconds": deletion_delay_s,
            "serveConfigV2": serve_text,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": variant.idle_timeout_s,
                    # KubeRay's own default for the autoscaler sidecar, made explicit.
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod_template(
                        variant, node="head", shape=variant.head, grace_period_s=None, **templates
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": variant.worker_group,
                        "replicas": start_pods,
                        "minReplicas": variant.min_worker_pods,
                        "maxReplicas": variant.max_worker_pods,
                        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                        "template": _pod_template(
                            variant, node="worker", shape=variant.worker, grace_period_s=grace_s, **templates
                        ),
                    }
                ],
            },
        },
    }
    notes = [
        f"upgradeStrategy {variant.upgrade_reason}",
        f"rayClusterDeletionDelaySeconds = http_options.request_timeout_s ({deletion_delay_s} s): requests "
        "in flight when traffic switches to a new cluster may finish on the old one.",
        f"Worker group '{variant.worker_group}': pods of {variant.worker.cpus} CPUs, "
        f"{variant.worker.memory_gib} GiB, {variant.worker.gpus} GPU(s); minReplicas/maxReplicas = "
        f"{variant.min_worker_pods}/{variant.max_worker_pods} (the pod budget, fixed); "
        f"replicas = {start_pods} holds the Serve replicas at their minimum counts and {max_pods_needed} "
        "at their maximum ("
        + ", ".join(
            f"{d.stage} {d.min_replicas}..{d.max_replicas} x ({d.num_cpus:g} CPU, {d.num_gpus:g} GPU)"
            for d in demands
        )
        + "); the Ray autoscaler adds and removes pods in between. A change of Serve replica counts "
        "changes only serveConfigV2 (applied by Serve, no new cluster) and replicas (the next cluster's "
        "start size). KubeRay does not apply a change of replicas/minReplicas/maxReplicas alone to a "
        "running cluster (docs/kubernetes.md, Scale).",
        f"Worker terminationGracePeriodSeconds = the longest graceful_shutdown_timeout_s + 30 = {grace_s}.",
        "Tracing env (RAY_SERVE_TRACING_*, ZIPVL_TRACING_*, OTEL_*) in every Ray container: zipvl_ray.k8s.TRACING.",
    ]
    if variant.model_cache is not None and _is_local_model(app["args"]["model"]):
        notes.append(
            f"Weights: the local directory {app['args']['model']}, on PVC {variant.model_cache.claim_name} "
            f"(mounted at {variant.model_cache.mount_path}); {MODEL_DOWNLOAD_JOB_OUTPUT} checks that it holds "
            "a checkpoint (copy it there first)."
        )
    elif variant.model_cache is not None:
        notes.append(
            f"Weights: {app['args']['model']} from the Hugging Face cache on PVC "
            f"{variant.model_cache.claim_name} (HF_HOME={variant.model_cache.hf_home}), filled by "
            f"{MODEL_DOWNLOAD_JOB_OUTPUT}; HF_TOKEN from Secret {variant.model_cache.token_secret} (optional)."
        )
    return Rendered(variant, manifest, changes, demands, start_pods, max_pods_needed, notes)


def _is_local_model(model: str) -> bool:
    """True for a directory path (``/models/my-llava``, ``./ckpt``), False for a hub id (``org/name``)."""
    return model.startswith(("/", "./", "../", "~"))


def _model_cache_manifests(variant: Variant, root: Path, image: str) -> dict[str, dict[str, Any]]:
    cache = variant.model_cache
    assert cache is not None
    model = _the_app(yaml.safe_load((root / variant.config).read_text()), variant.config)["args"]["model"]
    labels = {"app.kubernetes.io/name": "zipvl-ray", "app.kubernetes.io/instance": variant.name}
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": cache.claim_name, "labels": labels},
        "spec": {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.storage}}},
    }
    if _is_local_model(model):
        # A local directory is not downloaded: the Job checks that the checkpoint is where the replicas
        # will look, so that a missing copy fails here, not in every replica's constructor.
        download = (
            f"import os, sys; p = {model!r}; ok = os.path.isfile(os.path.join(p, 'config.json')); "
            "print(p, 'holds a checkpoint' if ok else 'holds no config.json'); "
            "sys.exit(0 if ok else 'copy the checkpoint to ' + p + ' on the volume first')"
        )
    else:
        download = (
            f"from huggingface_hub import snapshot_download; print(snapshot_download(repo_id={model!r}))"
        )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{variant.name}-model-download", "labels": labels},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "download",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", download],
                            "env": [
                                {"name": "HF_HOME", "value": cache.hf_home},
                                # The image sets HF_HUB_OFFLINE=1 so nothing else downloads.
                                {"name": "HF_HUB_OFFLINE", "value": "0"},
                                {
                                    "name": "HF_TOKEN",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": cache.token_secret,
                                            "key": "HF_TOKEN",
                                            "optional": True,
                                        }
                                    },
                                },
                            ],
                            "resources": PodShape(cpus=2, memory_gib=4).resources(),
                            "volumeMounts": [{"name": "model-cache", "mountPath": cache.mount_path}],
                        }
                    ],
                    "volumes": [
                        {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}
                    ],
                },
            },
        },
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": cache.token_secret, "labels": labels},
        "type": "Opaque",
        "stringData": {"HF_TOKEN": "hf_REPLACE_ME"},
    }
    return {MODEL_CACHE_PVC_OUTPUT: pvc, MODEL_DOWNLOAD_JOB_OUTPUT: job, TOKEN_SECRET_EXAMPLE_OUTPUT: secret}


class _ManifestDumper(yaml.SafeDumper):
    """Block style, list items indented under their key, multi-line strings as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):  # noqa: D102
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:  # noqa: D102
        return True  # no &id001 anchors: every block is written out


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml(document: dict[str, Any], header: Iterable[str] = ()) -> str:
    """A manifest as YAML text, after ``# `` comment lines."""
    comments = "".join(
        f"# {wrapped}\n" if wrapped else "#\n"
        for line in header
        for wrapped in (textwrap.wrap(line, width=106, subsequent_indent="  ") or [""])
    )
    return comments + yaml.dump(document, Dumper=_ManifestDumper, sort_keys=False, width=1000)


def render_files(root: Path = REPO_ROOT, image_repo: str | None = None) -> dict[str, str]:
    """Every generated file: ``{path relative to root: text}``."""
    files = {}
    for variant in VARIANTS:
        rendered = render_rayservice(variant, root, image_repo)
        header = [
            f"zipvl-ray on KubeRay {KUBERAY_VERSION} (ray.io/v1 RayService), Ray {RAY_VERSION}.",
            f"Generated from {variant.config} by `python -m zipvl_ray.k8s render`; do not edit by hand:",
            "change configs/ or zipvl_ray/k8s.py, re-render, and `python -m zipvl_ray.k8s check`.",
            "See docs/kubernetes.md.",
            "",
            *rendered.notes,
        ]
        files[variant.output] = to_yaml(rendered.manifest, header)
        if variant.model_cache is not None:
            image = rendered.manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0]["image"]
            extra_headers = {
                MODEL_CACHE_PVC_OUTPUT: [
                    f"Hugging Face cache for {variant.output}. ReadWriteMany needs a storage class that offers it",
                    "(NFS, EFS, Filestore, CephFS...): set spec.storageClassName to one.",
                ],
                MODEL_DOWNLOAD_JOB_OUTPUT: [
                    f"Fills the model cache once, before {variant.output} is applied (see docs/kubernetes.md).",
                ],
                TOKEN_SECRET_EXAMPLE_OUTPUT: [
                    "Example only: create the real Secret with",
                    "  kubectl create secret generic hf-token --from-literal=HF_TOKEN=hf_...",
                ],
            }
            for path, document in _model_cache_manifests(variant, root, image).items():
                header = [
                    "Generated by `python -m zipvl_ray.k8s render`; do not edit by hand.",
                    *extra_headers[path],
                ]
                files[path] = to_yaml(document, header)
    return files


# --------------------------------------------------------------------------------------------------
# Schema validation (CRD OpenAPI v3, strict)
# --------------------------------------------------------------------------------------------------

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}

#: metadata of a top-level object (the API server checks ObjectMeta itself; CRDs say only "object").
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _type_ok(value: Any, expected: str) -> bool:
    python_type = _TYPES.get(expected)
    if python_type is None:
        return True
    if isinstance(value, bool) and expected != "boolean":
        return False
    return isinstance(value, python_type)


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), type(value).__name__)


def _with_defaults(value: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    filled = dict(value)
    for key, sub in properties.items():
        if key not in filled and "default" in sub:
            filled[key] = copy.deepcopy(sub["default"])
    return filled


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Where ``value`` breaks a Kubernetes structural (OpenAPI v3) schema, with unknown fields as errors.

    Parameters
    ----------
    value : Any
        Parsed YAML.
    schema : dict
        An ``openAPIV3Schema`` (or a node of one).
    path : str
        Prefix of the reported paths.

    Returns
    -------
    list[str]
        ``"<path>: <problem>"`` entries; empty when valid.

    Notes
    -----
    An object's keys must be in ``properties`` (or match ``additionalProperties``) unless the node has
    ``x-kubernetes-preserve-unknown-fields``; a node with neither accepts no key (the API server would
    prune it). Defaults are applied before ``required`` is checked, as the API server does.
    ``x-kubernetes-int-or-string`` accepts integers and strings. Lists of type ``map`` / ``set``
    must not repeat keys / items. CEL rules (``x-kubernetes-validations``) are not evaluated.
    """
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{where}: expected an integer or a string, got {_type_name(value)}"]
    elif "type" in schema and not _type_ok(value, schema["type"]):
        return [f"{where}: expected {schema['type']}, got {_type_name(value)} {value!r}"[:200]]
    for branch_kind in ("anyOf", "oneOf"):
        branches = schema.get(branch_kind)
        if branches and all(schema_errors(value, branch, path) for branch in branches):
            errors.append(f"{where}: matches none of the {branch_kind} alternatives")
    for branch in schema.get("allOf", []):
        errors += schema_errors(value, branch, path)
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", math.inf) or len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: length {len(value)} is out of bounds")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = _INT_RANGES.get(schema.get("format", ""), (-math.inf, math.inf))
        low = max(low, schema.get("minimum", -math.inf))
        high = min(high, schema.get("maximum", math.inf))
        if not low <= value <= high:
            errors.append(f"{where}: {value} is out of range [{low}, {high}]")
    if isinstance(value, list):
        errors += _array_errors(value, schema, path)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    return errors


def _array_errors(value: list[Any], schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    if len(value) > schema.get("maxItems", math.inf) or len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: {len(value)} items is out of bounds")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, items, f"{path}[{i}]")
    list_type = schema.get("x-kubernetes-list-type")
    seen: set[str] = set()
    for i, item in enumerate(value):
        if list_type == "map" and isinstance(item, dict) and isinstance(items, dict):
            filled = _with_defaults(item, items.get("properties", {}))
            key = repr([filled.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])])
        elif list_type == "set":
            key = repr(item)
        else:
            continue
        if key in seen:
            errors.append(f"{path}[{i}]: duplicate entry {key} in a list of type {list_type}")
        seen.add(key)
    return errors


def _object_errors(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    properties = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    embedded = schema.get("x-kubernetes-embedded-resource", False)
    filled = _with_defaults(value, properties)
    for key in schema.get("required", []):
        if key not in filled:
            errors.append(f"{path + '.' if path else ''}{key}: required field is missing")
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            errors.append(f"{where}: keys must be strings")
        elif key in properties:
            errors += schema_errors(item, properties[key], where)
        elif isinstance(additional, dict):
            errors += schema_errors(item, additional, where)
        elif embedded and key in ("apiVersion", "kind", "metadata"):
            continue
        elif not (preserve or additional is True):
            errors.append(f"{where}: unknown field")
    return errors


def _served_schemas(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    spec = document["spec"]
    schemas = {}
    for version in spec["versions"]:
        if version.get("served"):
            api_version = f"{spec['group']}/{version['name']}"
            schemas[api_version, spec["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@lru_cache(maxsize=4)
def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): openAPIV3Schema}`` of every CRD in ``crd_dir`` (plus the core kinds used here)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for file in sorted(Path(crd_dir).glob("*.yaml")):
        for document in yaml.load_all(file.read_text(), Loader=loader):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                schemas.update(_served_schemas(document))
    if ("ray.io/v1", "RayCluster") in schemas:
        schemas.update(_core_schemas(schemas["ray.io/v1", "RayCluster"]))
    return schemas


def _core_schemas(ray_cluster: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Schemas of the core kinds in ``k8s/``, assembled from the Kubernetes types the CRD embeds.

    The RayCluster CRD carries the full PodTemplateSpec (head template) and PersistentVolumeClaimSpec
    (ephemeral volume template); Job and Secret wrap them with the few fields used here.
    """
    spec = ray_cluster["properties"]["spec"]["properties"]
    pod_template = spec["headGroupSpec"]["properties"]["template"]
    volume = pod_template["properties"]["spec"]["properties"]["volumes"]["items"]
    pvc_spec = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    int32 = {"type": "integer", "format": "int32"}

    def kind(api_version: str, kind_name: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata"],
            "properties": {
                "apiVersion": {"type": "string", "enum": [api_version]},
                "kind": {"type": "string", "enum": [kind_name]},
                "metadata": {"type": "object"},
                **fields,
            },
        }

    job_spec = {
        "type": "object",
        "required": ["template"],
        "properties": {
            "template": pod_template,
            "backoffLimit": int32,
            "ttlSecondsAfterFinished": int32,
            "activeDeadlineSeconds": {"type": "integer", "format": "int64"},
            "completions": int32,
            "parallelism": int32,
        },
    }
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        ("v1", "PersistentVolumeClaim"): kind("v1", "PersistentVolumeClaim", spec=pvc_spec),
        ("batch/v1", "Job"): kind("batch/v1", "Job", spec=job_spec),
        ("v1", "Secret"): kind(
            "v1",
            "Secret",
            type={"type": "string"},
            data=string_map,
            stringData=string_map,
            immutable={"type": "boolean"},
        ),
    }


def resource_schema_errors(document: Any, schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """A manifest against the schema of its ``apiVersion`` / ``kind``, strictly."""
    if not isinstance(document, dict):
        return ["<root>: a manifest must be a mapping"]
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in schemas:
        return [f"<root>: no schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    schema = copy.copy(schemas[key])
    schema["properties"] = {**schema.get("properties", {}), "metadata": OBJECT_META_SCHEMA}
    errors = schema_errors(document, schema)
    metadata = document.get("metadata") or {}
    if not (metadata.get("name") or metadata.get("generateName")):
        errors.append("metadata.name: required field is missing")
    return errors


# --------------------------------------------------------------------------------------------------
# serveConfigV2 and import checks
# --------------------------------------------------------------------------------------------------


def _validation_errors(error: Exception, prefix: str) -> list[str]:
    entries = getattr(error, "errors", None)
    if not callable(entries):
        # Ray's validators import router / policy classes and may raise ImportError & co. directly.
        return [f"{prefix or '<root>'}: {type(error).__name__}: {error}"]
    return [f"{prefix}{'.' if prefix else ''}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in entries()]


def serve_config_errors(config: Any) -> list[str]:
    """A Serve config (parsed) strictly against Ray's ``ServeDeploySchema`` and the app's ``AppArgs``."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import AppArgs
    from deployments.schema_check import unknown_keys

    if not isinstance(config, dict):
        return ["<root>: a Serve config must be a mapping"]
    errors = [f"{key}: unknown key (misspelled?)" for key in unknown_keys(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as error:  # noqa: BLE001 - every failure is a finding
        errors += _validation_errors(error, "")
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == APP_IMPORT_PATH:
            try:
                AppArgs.model_validate(app.get("args") or {})
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                errors += _validation_errors(error, f"applications[{i}].args")
    return errors


def import_paths(config: Any) -> Iterator[tuple[str, str]]:
    """``(where, "module:attribute")`` for every import path a Serve config names."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                inner = f"{where}.{key}" if where else str(key)
                if key in IMPORT_PATH_KEYS and isinstance(value, str):
                    yield inner, value
                else:
                    yield from walk(value, inner)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{where}[{i}]")

    yield from walk(config, "")


def import_errors(paths: Iterable[tuple[str, str]]) -> list[str]:
    """Import paths that do not resolve here, or that live outside the packages the image installs."""
    errors = []
    for where, path in paths:
        module, _, attribute = path.partition(":")
        if module.split(".")[0] not in IMAGE_PACKAGES:
            errors.append(f"{where}: {path} is not in the image's packages {IMAGE_PACKAGES}")
            continue
        try:
            target: Any = importlib.import_module(module)
            for part in filter(None, attribute.split(".")):
                target = getattr(target, part)
        except Exception as error:  # noqa: BLE001 - any import failure is the finding
            errors.append(f"{where}: {path} does not import: {type(error).__name__}: {error}")
    return errors


def config_import_paths(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The config's import paths plus the engine / encoder defaults ``AppArgs`` fills in."""
    from deployments.app import AppArgs

    found = dict(import_paths(config))
    for i, app in enumerate(config.get("applications") or []):
        if app.get("import_path") == APP_IMPORT_PATH:
            args = AppArgs.model_validate(app.get("args") or {})
            found.setdefault(f"applications[{i}].args.engine_class", args.engine_class)
            found.setdefault(f"applications[{i}].args.encoder_class", args.encoder_class)
    return list(found.items())


# --------------------------------------------------------------------------------------------------
# Checks of a manifest and of the k8s/ folder
# --------------------------------------------------------------------------------------------------


def manifest_errors(document: Any, schemas: dict[tuple[str, str], dict[str, Any]] | None) -> list[str]:
    """Every problem of one manifest: its schema (when ``schemas`` is given), and for a RayService its
    ``serveConfigV2`` (strict Serve schema, ``AppArgs``, import paths) and tracing exporter."""
    errors = resource_schema_errors(document, schemas) if schemas is not None else []
    if isinstance(document, dict) and document.get("kind") == "RayService":
        text = (document.get("spec") or {}).get("serveConfigV2")
        if not isinstance(text, str):
            return [*errors, "spec.serveConfigV2: missing"]
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as error:
            return [*errors, f"spec.serveConfigV2: not YAML: {error}"]
        serve_errors = serve_config_errors(config)
        if not serve_errors:
            serve_errors = import_errors(config_import_paths(config))
        errors += [f"spec.serveConfigV2: {e}" for e in serve_errors]
        errors += _container_env_errors(document)
    return errors


def _container_env_errors(document: dict[str, Any]) -> list[str]:
    """The tracing exporter named in the Ray containers' env must import in the image too."""
    cluster = (document.get("spec") or {}).get("rayClusterConfig") or {}
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    found = []
    for where, group in groups:
        for c, container in enumerate(
            ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        ):
            for e, env in enumerate(container.get("env") or []):
                if env.get("name") == "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH" and env.get("value"):
                    location = f"spec.rayClusterConfig.{where}.template.spec.containers[{c}].env[{e}].value"
                    found.append((location, env["value"]))
    return import_errors(found)


@dataclass
class CheckReport:
    """Outcome of :func:`check_folder`.

    Attributes
    ----------
    errors : dict[str, list[str]]
        Problems by file (relative path); an empty list for a clean file.
    checked : list[str]
        Files read and validated.
    skipped : list[str]
        Checks not run, and why (e.g. no CRD folder).
    """

    errors: dict[str, list[str]] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.errors.values())


def check_folder(root: Path = REPO_ROOT, crd_dir: Path | None = DEFAULT_CRD_DIR) -> CheckReport:
    """Validate every ``k8s/*.yaml`` under ``root`` and compare the generated ones with a fresh render."""
    report = CheckReport()
    schemas = None
    if crd_dir is not None and Path(crd_dir).is_dir():
        schemas = load_crd_schemas(Path(crd_dir))
    else:
        report.skipped.append(f"CRD schema validation: no KubeRay CRDs at {crd_dir}")
    try:
        expected = render_files(root)
    except (ValueError, OSError) as exc:  # a config the renderer refuses: a finding, not a traceback
        report.errors.setdefault("configs", []).append(f"cannot render the manifests: {exc}")
        expected = {}
    present = sorted(p.relative_to(root).as_posix() for p in (root / "k8s").glob("*.yaml"))
    for path in sorted(set(present) | set(expected)):
        problems = report.errors.setdefault(path, [])
        file = root / path
        if not file.exists():
            problems.append("missing: run `python -m zipvl_ray.k8s render`")
            continue
        text = file.read_text()
        if path in expected and text != expected[path]:
            problems.append("differs from a fresh render: run `python -m zipvl_ray.k8s render`")
        for i, document in enumerate(yaml.safe_load_all(text)):
            problems += [f"document {i}: {e}" for e in manifest_errors(document, schemas)]
        report.checked.append(path)
    return report


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    """Write ``{relative path: text}`` under ``out`` (the ``k8s/`` prefix is kept)."""
    written = []
    for relative, text in files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """``render`` | ``check`` | ``imports`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m zipvl_ray.k8s", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write k8s/*.yaml from configs/")
    render.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (has configs/)")
    render.add_argument("--out", type=Path, help="write under this folder instead of --root")
    render.add_argument("--image-repo", help="image repository instead of the default (needs --out)")
    check = commands.add_parser("check", help="validate k8s/*.yaml (CRDs, Serve schema, drift)")
    check.add_argument("--root", type=Path, default=REPO_ROOT)
    check.add_argument("--crd-dir", type=Path, default=DEFAULT_CRD_DIR, help="KubeRay CRD YAML folder")
    imports = commands.add_parser("imports", help="check that a Serve config's import paths resolve here")
    imports.add_argument("configs", nargs="+", type=Path)
    args = parser.parse_args(argv)

    if args.command == "render":
        if args.image_repo and not args.out:
            parser.error("--image-repo changes the images: write elsewhere with --out, not over k8s/")
        for path in write_files(render_files(args.root, args.image_repo), args.out or args.root):
            print(f"wrote {path}")
        return 0
    if args.command == "imports":
        errors = []
        for config in args.configs:
            data = yaml.safe_load(config.read_text())
            errors += [f"{config}: {e}" for e in import_errors(config_import_paths(data))]
        print("\n".join(errors) or f"all import paths resolve ({len(args.configs)} configs)")
        return 1 if errors else 0
    report = check_folder(args.root, args.crd_dir)
    for note in report.skipped:
        print(f"skipped: {note}")
    for path in report.checked:
        problems = report.errors.get(path) or []
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
    for path, problems in report.errors.items():
        if path not in report.checked:
            print(f"{path}: " + "; ".join(problems))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
