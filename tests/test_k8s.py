"""``zipvl_ray.k8s``: the rendered manifests match ``configs/``, pass the KubeRay CRDs strictly, and
every misspelling is caught by the one check the CLI runs.

Tests that need the KubeRay v1.7.0 CRDs (``../shared/kuberay/`` beside the repository) skip when the
folder is absent (a user's clone has none); the schema semantics are also tested on small inline
schemas that need no CRD.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from zipvl_ray import k8s

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = k8s.DEFAULT_CRD_DIR
MANIFESTS = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "k8s").glob("*.yaml"))

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"no KubeRay CRDs at {CRD_DIR}")


@pytest.fixture(scope="module")
def schemas() -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRD_DIR}")
    return k8s.load_crd_schemas(CRD_DIR)


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return k8s.render_files(REPO_ROOT)


def load(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / path).read_text())


def ray_containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"]["containers"][0] for group in groups]


# ---------------------------------------------------------------------------------------------
# No drift from configs/
# ---------------------------------------------------------------------------------------------


def test_committed_manifests_equal_a_fresh_render(rendered):
    stale = [path for path, text in rendered.items() if (REPO_ROOT / path).read_text() != text]
    assert stale == [], f"{stale} differ from configs/: run `python -m zipvl_ray.k8s render` and commit"
    assert sorted(rendered) == MANIFESTS


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_serve_config_is_the_config_file_with_only_the_documented_changes(variant):
    manifest = load(variant.output)
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    source = load(variant.config)
    documented = {path for path, _, _ in k8s.POD_SERVE_CONFIG_CHANGES}
    for path, value, _ in k8s.POD_SERVE_CONFIG_CHANGES:
        *parents, leaf = path.split(".")
        node = served
        for part in parents:
            node = node[part]
        assert node[leaf] == value
    # Put back the changed values: everything else is the file, key for key.
    _, changes = k8s.pod_serve_config(source)
    assert {c.path for c in changes} <= documented
    for change in changes:
        *parents, leaf = change.path.split(".")
        node = served
        for part in parents:
            node = node[part]
        node[leaf] = change.before
    assert served == source


@pytest.mark.parametrize(
    "config, expected_host, expected_changes",
    [
        (
            {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000}},
            "0.0.0.0",
            ["http_options.host", "proxy_location"],
        ),
        ({"http_options": {"port": 8000}}, "0.0.0.0", ["http_options.host", "proxy_location"]),
        ({}, "0.0.0.0", ["http_options.host", "proxy_location"]),
        ({"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0"}}, "0.0.0.0", []),
    ],
)
def test_pod_serve_config_changes_only_the_proxy_host_and_location(config, expected_host, expected_changes):
    """The host must accept the Service's connections, and every node needs a proxy: KubeRay labels every
    RayService worker pod for the serving Service and leaves traffic to the readiness probe (a HeadOnly
    config sent requests to workers that refuse them; the probe now checks each worker's proxy)."""
    original = copy.deepcopy(config)
    result, changes = k8s.pod_serve_config(config)
    assert result["http_options"]["host"] == expected_host
    assert result["proxy_location"] == "EveryNode"
    assert [c.path for c in changes] == expected_changes
    assert result["http_options"].get("port") == config.get("http_options", {}).get("port")
    assert config == original  # the caller's dict is left alone


# ---------------------------------------------------------------------------------------------
# The manifests against the CRDs and the Serve schema
# ---------------------------------------------------------------------------------------------


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS)
def test_every_manifest_passes_the_crds_and_the_serve_schema(path, schemas):
    documents = list(yaml.safe_load_all((REPO_ROOT / path).read_text()))
    assert documents
    for document in documents:
        assert k8s.manifest_errors(document, schemas) == []


@needs_crds
def test_check_command_passes_on_the_repository(capsys):
    assert k8s.main(["check", "--crd-dir", str(CRD_DIR)]) == 0
    output = capsys.readouterr().out
    assert all(f"{path}: ok" in output for path in MANIFESTS)
    assert "skipped" not in output


def test_check_without_crds_still_checks_serve_configs_and_drift(tmp_path):
    report = k8s.check_folder(REPO_ROOT, crd_dir=tmp_path / "absent")
    assert report.ok
    assert report.skipped and "no KubeRay CRDs" in report.skipped[0]
    assert sorted(report.checked) == MANIFESTS


def _rename(path: str, new_key: str) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        node = _walk(manifest, parents)
        node[new_key] = node.pop(leaf)

    return mutate


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        _walk(manifest, parents)[leaf] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        del _walk(manifest, parents)[leaf]

    return mutate


def _in_serve_config(change: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
        change(config)
        manifest["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)

    return mutate


def _walk(node: Any, parts: list[str]) -> Any:
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


RC = "spec.rayClusterConfig"
WORKER = f"{RC}.workerGroupSpecs.0"
WORKER_CONTAINER = f"{WORKER}.template.spec.containers.0"
LLM = "applications.0.args.llm"

# (id, needs the CRDs, mutation of k8s/rayservice.yaml, the one error expected)
MISTAKES = [
    (
        "enableInTreeAutoScaling",
        True,
        _rename(f"{RC}.enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        "spec.rayClusterConfig.enableInTreeAutoScaling: unknown field",
    ),
    (
        "minReplica",
        True,
        _rename(f"{WORKER}.minReplicas", "minReplica"),
        "spec.rayClusterConfig.workerGroupSpecs[0].minReplica: unknown field",
    ),
    (
        "args.llm.num_replica",
        False,
        _in_serve_config(_rename(f"{LLM}.num_replicas", "num_replica")),
        "spec.serveConfigV2: applications[0].args.llm.num_replica: Extra inputs are not permitted",
    ),
    (
        "deployments[].num_replica",
        False,
        _in_serve_config(_set("applications.0.deployments", [{"name": "LLMServer", "num_replica": 2}])),
        "spec.serveConfigV2: applications[0].deployments[0].num_replica: unknown key (misspelled?)",
    ),
    (
        "autoscaling_config.min_replica",
        False,
        _in_serve_config(
            lambda c: (
                c["applications"][0]["args"]["llm"].pop("num_replicas"),
                _set(f"{LLM}.autoscaling_config", {"min_replica": 1, "max_replicas": 4})(c),
            )
        ),
        "spec.serveConfigV2: applications[0].args.llm: Value error, unknown keys (misspelled?): "
        "autoscaling_config.min_replica",
    ),
    (
        "http_options.prot",
        False,
        _in_serve_config(_set("http_options.prot", 8000)),
        "spec.serveConfigV2: http_options.prot: unknown key (misspelled?)",
    ),
    (
        "args.zipvl.tau out of range",
        False,
        _in_serve_config(_set("applications.0.args.zipvl.tau", 2)),
        "spec.serveConfigV2: applications[0].args.zipvl.tau:",
    ),
    (
        "router class that does not import",
        False,
        _in_serve_config(
            _set(
                f"{LLM}.request_router_config",
                {"request_router_class": "zipvl_ray.routing.router:NoSuchRouter"},
            )
        ),
        "spec.serveConfigV2: applications[0].args: AttributeError: module 'zipvl_ray.routing.router' "
        "has no attribute 'NoSuchRouter'",
    ),
    (
        "test fake as the engine (not in the image)",
        False,
        _in_serve_config(_set("applications.0.args.engine_class", "tests.deployments.fakes:FakeEngine")),
        "spec.serveConfigV2: applications[0].args.engine_class: tests.deployments.fakes:FakeEngine is not "
        "in the image's packages",
    ),
    (
        "policy module that does not exist",
        False,
        _in_serve_config(
            lambda c: (
                c["applications"][0]["args"]["llm"].pop("num_replicas"),
                _set(
                    f"{LLM}.autoscaling_config",
                    {"max_replicas": 4, "policy": {"policy_function": "my_policies:scale"}},
                )(c),
            )
        ),
        "spec.serveConfigV2: applications[0].args: ModuleNotFoundError: No module named 'my_policies'",
    ),
    (
        "tracing exporter that does not import",
        False,
        lambda m: next(
            env
            for env in _walk(m, WORKER_CONTAINER.split("."))["env"]
            if env["name"] == "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"
        ).update(value="zipvl_ray.telemetry:span_processor"),
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].env[0].value: "
        "zipvl_ray.telemetry:span_processor does not import",
    ),
    (
        "upgradeStrategy.typ",
        True,
        _rename("spec.upgradeStrategy.type", "typ"),
        "spec.upgradeStrategy.typ: unknown field",
    ),
    (
        "container resource",
        True,
        _rename(f"{WORKER_CONTAINER}.resources", "resource"),
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field",
    ),
    (
        "missing groupName",
        True,
        _delete(f"{WORKER}.groupName"),
        "spec.rayClusterConfig.workerGroupSpecs[0].groupName: required field is missing",
    ),
    (
        "minReplicas as a string",
        True,
        _set(f"{WORKER}.minReplicas", "1"),
        "spec.rayClusterConfig.workerGroupSpecs[0].minReplicas: expected integer, got string",
    ),
    (
        "maxReplicas beyond int32",
        True,
        _set(f"{WORKER}.maxReplicas", 2**31),
        "spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas: 2147483648 is out of range",
    ),
    (
        "num-cpus as a number",
        True,
        _set(f"{RC}.headGroupSpec.rayStartParams.num-cpus", 0),
        "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: expected string, got integer",
    ),
    (
        "bad CPU quantity",
        True,
        _set(f"{WORKER_CONTAINER}.resources.limits.cpu", "8 cores"),
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: "
        "'8 cores' does not match",
    ),
    (
        "duplicate env var",
        True,
        lambda m: _walk(m, WORKER_CONTAINER.split("."))["env"].append({"name": "HF_HOME", "value": "/x"}),
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].env[",
    ),
    (
        "unknown upscalingMode",
        True,
        _set(f"{RC}.autoscalerOptions.upscalingMode", "Fast"),
        "spec.rayClusterConfig.autoscalerOptions.upscalingMode: 'Fast' is not one of",
    ),
    (
        "metadata.nam",
        True,
        _rename("metadata.name", "nam"),
        "metadata.nam: unknown field",
    ),
]


@pytest.mark.parametrize(
    "needs_schema, mutate, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_the_check_catches_each_mistake(needs_schema, mutate, expected, request):
    schemas = request.getfixturevalue("schemas") if needs_schema else None
    manifest = load(k8s.GPU_VARIANT.output)
    assert k8s.manifest_errors(manifest, schemas) == []
    broken = copy.deepcopy(manifest)
    mutate(broken)
    errors = k8s.manifest_errors(broken, schemas)
    # "metadata.name" renamed away also leaves the name missing; everything else is one finding.
    relevant = [e for e in errors if e != "metadata.name: required field is missing"]
    assert len(relevant) == 1 and relevant[0].startswith(expected), errors


# ---------------------------------------------------------------------------------------------
# Schema semantics on small schemas (no CRD needed)
# ---------------------------------------------------------------------------------------------

INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
PORTS = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["containerPort", "protocol"],
    "items": {
        "type": "object",
        "required": ["containerPort"],
        "properties": {
            "containerPort": {"type": "integer", "format": "int32"},
            "protocol": {"type": "string", "default": "TCP"},
        },
    },
}


@pytest.mark.parametrize(
    "schema, value, expected",
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}},
            {"a": "x", "b": 1},
            ["b: unknown field"],
        ),
        (
            {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
            {"a": "x", "b": {"anything": [1]}},
            [],
        ),
        (
            {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
            {"a": 3},
            ["a: expected string, got integer 3"],
        ),
        ({"type": "object"}, {"b": 1}, ["b: unknown field"]),
        (
            {"type": "object", "additionalProperties": {"type": "string"}},
            {"k": "v", "n": 1},
            ["n: expected string"],
        ),
        ({"type": "object", "additionalProperties": True}, {"k": [1]}, []),
        (
            {
                "type": "object",
                "x-kubernetes-embedded-resource": True,
                "properties": {"spec": {"type": "object"}},
            },
            {"apiVersion": "v1", "kind": "X", "metadata": {}},
            [],
        ),
        # The API server fills defaults before it checks `required`.
        (
            {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "default": 0}}},
            {},
            [],
        ),
        (
            {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
            {},
            ["n: required field"],
        ),
        ({"type": "object", "properties": {"q": INT_OR_STRING}}, {"q": 3}, []),
        ({"type": "object", "properties": {"q": INT_OR_STRING}}, {"q": "50%"}, []),
        (
            {"type": "object", "properties": {"q": INT_OR_STRING}},
            {"q": 1.5},
            ["q: expected an integer or a string"],
        ),
        (
            {"type": "object", "properties": {"q": INT_OR_STRING}},
            {"q": True},
            ["q: expected an integer or a string"],
        ),
        (
            {"type": "object", "properties": {"b": {"type": "boolean"}}},
            {"b": "true"},
            ["b: expected boolean"],
        ),
        ({"type": "object", "properties": {"n": {"type": "integer"}}}, {"n": True}, ["n: expected integer"]),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "format": "int32"}}},
            {"n": -(2**31)},
            [],
        ),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
            {"n": -1},
            ["n: -1 is out"],
        ),
        ({"type": "object", "properties": {"s": {"type": "string", "nullable": True}}}, {"s": None}, []),
        (
            {"type": "object", "properties": {"s": {"type": "string"}}},
            {"s": None},
            ["s: null is not allowed"],
        ),
        (
            {"type": "object", "properties": {"e": {"type": "string", "enum": ["A"]}}},
            {"e": "B"},
            ["e: 'B' is not"],
        ),
        (
            {"type": "object", "properties": {"p": PORTS}},
            {"p": [{"containerPort": 1}, {"containerPort": 2}]},
            [],
        ),
        (
            {"type": "object", "properties": {"p": PORTS}},
            {"p": [{"containerPort": 80}, {"containerPort": 80, "protocol": "TCP"}]},
            ["p[1]: duplicate entry"],
        ),
        (
            {"type": "object", "properties": {"p": PORTS}},
            {"p": [{"containerPort": 80, "protocol": "UDP"}, {"containerPort": 80}]},
            [],
        ),
        (
            {"type": "object", "properties": {"p": PORTS}},
            {"p": [{"protocol": "TCP"}]},
            ["p[0].containerPort: required"],
        ),
        (
            {
                "type": "object",
                "properties": {
                    "s": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}
                },
            },
            {"s": ["a", "a"]},
            ["s[1]: duplicate entry"],
        ),
    ],
)
def test_schema_semantics(schema, value, expected):
    errors = k8s.schema_errors(value, schema)
    assert len(errors) == len(expected), errors
    assert all(error.startswith(prefix) for error, prefix in zip(errors, expected, strict=True)), errors


# ---------------------------------------------------------------------------------------------
# What the manifests promise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_cluster_shape(variant):
    manifest = load(variant.output)
    config = load(variant.config)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert cluster["rayVersion"] == k8s.RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert manifest["spec"]["upgradeStrategy"]["type"] in (
        "NewCluster",
        "NewClusterWithIncrementalUpgrade",
        "None",
    )
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (variant.min_worker_pods, variant.max_worker_pods)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["replicas"] >= 1
    head_ports = {p["name"]: p["containerPort"] for p in ray_containers(manifest)[0]["ports"]}
    assert head_ports["serve"] == config["http_options"]["port"]
    assert head_ports["metrics"] == int(cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"])
    for container in ray_containers(manifest):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"] and {"cpu", "memory"} <= set(resources["limits"])
        assert container["readinessProbe"]["exec"] and container["livenessProbe"]["exec"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {name: env.get(name) for name in k8s.TRACING_ENV} == k8s.TRACING_ENV
        assert container["image"].endswith(f":{k8s.package_version()}{variant.image_tag_suffix}")


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_api_keys_come_from_an_optional_secret_in_every_ray_container(variant):
    """Replicas inherit the node environment: creating the Secret turns authentication on, without a hand
    edit that the check would flag and without the keys ever entering the Serve config."""
    from zipvl_ray.api.auth import DEFAULT_API_KEYS_ENV

    manifest = load(variant.output)
    for container in ray_containers(manifest):
        (entry,) = [e for e in container["env"] if e["name"] == DEFAULT_API_KEYS_ENV]
        assert entry["valueFrom"]["secretKeyRef"] == {
            "name": "zipvl-api-keys",
            "key": "keys",
            "optional": True,
        }
    assert "zipvl-api-keys" not in str(manifest["spec"]["serveConfigV2"])


def test_gpu_manifest_runs_the_gpu_config_on_gpu_workers():
    manifest = load(k8s.GPU_VARIANT.output)
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["device"] == "cuda"
    head, worker = ray_containers(manifest)
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Proxies on every node: a worker is ready for traffic only when its proxy answers.
    assert served["proxy_location"] == "EveryNode"
    assert "/-/healthz" in worker["readinessProbe"]["exec"]["command"][-1]
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    demands = k8s.stage_demands(served["applications"][0]["args"])
    gpus = sum(d.max_replicas * d.num_gpus for d in demands)
    assert group["maxReplicas"] >= gpus >= 1
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    longest_shutdown = max(d.graceful_shutdown_timeout_s for d in demands)
    assert group["template"]["spec"]["terminationGracePeriodSeconds"] > longest_shutdown


def test_gpu_weights_come_from_the_model_cache_filled_by_the_job():
    cache = k8s.GPU_VARIANT.model_cache
    manifest = load(k8s.GPU_VARIANT.output)
    pvc = load(k8s.MODEL_CACHE_PVC_OUTPUT)
    job = load(k8s.MODEL_DOWNLOAD_JOB_OUTPUT)
    secret = load(k8s.TOKEN_SECRET_EXAMPLE_OUTPUT)
    model = load(k8s.GPU_VARIANT.config)["applications"][0]["args"]["model"]
    assert pvc["metadata"]["name"] == cache.claim_name
    pod_specs = [g["template"]["spec"] for g in [manifest["spec"]["rayClusterConfig"]["headGroupSpec"]]]
    pod_specs += [g["template"]["spec"] for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    pod_specs.append(job["spec"]["template"]["spec"])
    for spec in pod_specs:
        assert spec["volumes"] == [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}
        ]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_HOME"]["value"] == cache.hf_home
        token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": secret["metadata"]["name"], "key": "HF_TOKEN", "optional": True}
    assert repr(model) in job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}[
        "HF_HUB_OFFLINE"
    ] == "0"
    # The replicas themselves stay offline: they read the cache, never the hub.
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served["applications"][0]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("present", [True, False])
def test_a_local_model_directory_is_checked_by_the_job_not_downloaded(tmp_path, present):
    """``args.model`` may be a directory on the volume (docs/kubernetes.md): the Job then checks that the
    checkpoint is there (snapshot_download of a path raised HFValidationError)."""
    import subprocess
    import sys

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    if present:
        (checkpoint / "config.json").write_text("{}")
    root = _copy_repo_inputs(tmp_path / "repo")
    config = yaml.safe_load((root / k8s.GPU_VARIANT.config).read_text())
    config["applications"][0]["args"]["model"] = str(checkpoint)
    (root / k8s.GPU_VARIANT.config).write_text(yaml.safe_dump(config, sort_keys=False))
    files = k8s.render_files(root)
    job = yaml.safe_load(files[k8s.MODEL_DOWNLOAD_JOB_OUTPUT])
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "snapshot_download" not in command[-1]
    run = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True)
    assert (run.returncode == 0) == present, run.stderr
    if not present:
        assert f"copy the checkpoint to {checkpoint} on the volume first" in run.stderr
    assert f"the local directory {checkpoint}" in files[k8s.GPU_VARIANT.output]


def test_cpu_manifest_serves_a_builtin_model_without_volumes():
    from zipvl_ray.models import builtin_model_names

    manifest = load(k8s.CPU_VARIANT.output)
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["model"] in builtin_model_names()
    assert served["http_options"]["host"] == "0.0.0.0"
    for container in ray_containers(manifest):
        assert "volumeMounts" not in container and "nvidia.com/gpu" not in container["resources"]["limits"]
        assert (
            int(container["resources"]["limits"]["memory"].removesuffix("Gi")) <= 4
        )  # fits a laptop cluster


# ---------------------------------------------------------------------------------------------
# Sizing
# ---------------------------------------------------------------------------------------------

GPU_POD = k8s.PodShape(cpus=8, memory_gib=64, gpus=1)


def demand(stage="llm", low=1, high=1, cpus=1.0, gpus=0.0) -> k8s.StageDemand:
    return k8s.StageDemand(stage, low, high, cpus, gpus, 20.0)


@pytest.mark.parametrize(
    "demands, pod, bound, expected",
    [
        ([demand(low=4, high=4, cpus=4, gpus=1), demand("ingress", 2, 2, cpus=2)], GPU_POD, "min", 4),
        ([demand(low=2, high=8, cpus=4, gpus=1)], GPU_POD, "max", 8),
        ([demand(low=2, high=8, cpus=4, gpus=1)], GPU_POD, "min", 2),
        ([demand(low=4, high=4, cpus=1, gpus=0.5)], GPU_POD, "min", 2),  # fractional GPUs share a pod
        ([demand(low=5, high=5, cpus=4, gpus=0)], GPU_POD, "min", 3),  # CPU-bound
        ([demand(low=3, high=3, cpus=0, gpus=0)], GPU_POD, "min", 0),  # fits anywhere, even the head
        ([demand(low=0, high=3, cpus=2, gpus=1)], GPU_POD, "min", 0),
    ],
)
def test_worker_pods_needed(demands, pod, bound, expected):
    assert k8s.worker_pods_needed(demands, pod, bound) == expected


def test_a_replica_larger_than_a_pod_is_refused():
    with pytest.raises(ValueError, match="a llm replica needs 16 CPUs"):
        k8s.worker_pods_needed([demand(cpus=16, gpus=1)], GPU_POD, "min")


@pytest.mark.parametrize(
    "llm, expected",
    [
        ({"num_replicas": 3}, (3, 3)),
        ({}, (1, 1)),
        ({"autoscaling_config": {"min_replicas": 2, "max_replicas": 6}}, (2, 6)),
        ({"num_replicas": "auto"}, (1, 100)),  # Serve's defaults for "auto"
        ({"num_replicas": "auto", "autoscaling_config": {"max_replicas": 7}}, (1, 7)),
    ],
)
def test_stage_demands_follow_serve_replica_bounds(llm, expected):
    demands = {d.stage: d for d in k8s.stage_demands({"llm": {"num_gpus": 1, **llm}})}
    assert (demands["llm"].min_replicas, demands["llm"].max_replicas) == expected
    assert demands["ingress"].num_cpus == 1.0  # Serve reserves one CPU per replica by default


def _render_with_llm(tmp_path: Path, **llm: Any) -> dict:
    root = _copy_repo_inputs(tmp_path)
    config = yaml.safe_load((root / k8s.GPU_VARIANT.config).read_text())
    config["applications"][0]["args"]["llm"].pop("num_replicas", None)
    config["applications"][0]["args"]["llm"].pop("autoscaling_config", None)
    config["applications"][0]["args"]["llm"].update(llm)
    (root / k8s.GPU_VARIANT.config).write_text(yaml.safe_dump(config, sort_keys=False))
    return k8s.render_rayservice(k8s.GPU_VARIANT, root).manifest


def test_a_serve_replica_change_leaves_the_cluster_spec_alone_except_replicas(tmp_path):
    """KubeRay starts a new cluster (doubling the GPUs) on a cluster-spec change, not on these."""
    current = yaml.safe_load((REPO_ROOT / k8s.GPU_VARIANT.output).read_text())
    changed = _render_with_llm(tmp_path, num_replicas=2)
    assert changed["spec"]["serveConfigV2"] != current["spec"]["serveConfigV2"]
    assert changed["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3  # vision + 2 LLM
    for manifest in (current, changed):
        manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("replicas")
    assert changed["spec"]["rayClusterConfig"] == current["spec"]["rayClusterConfig"]


def test_worker_group_starts_with_the_autoscaling_minimum(tmp_path):
    manifest = _render_with_llm(tmp_path, autoscaling_config={"min_replicas": 1, "max_replicas": 8})
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 2  # the vision GPU and one LLM GPU; the autoscaler adds the rest
    assert group["maxReplicas"] == k8s.GPU_VARIANT.max_worker_pods >= 9


def test_a_config_beyond_the_pod_budget_is_refused(tmp_path):
    budget = k8s.GPU_VARIANT.max_worker_pods
    vision_max = {
        d.stage: d for d in k8s.stage_demands(load(k8s.GPU_VARIANT.config)["applications"][0]["args"])
    }["vision"].max_replicas
    with pytest.raises(ValueError, match=f"needs up to {budget + vision_max} worker pods"):
        _render_with_llm(tmp_path, autoscaling_config={"min_replicas": 1, "max_replicas": budget})


def test_deployment_overrides_resize_the_worker_group_and_pass_through(tmp_path):
    """Serve's per-deployment overrides change replicas without changing the app's code version (a change
    under args replaces every replica): the renderer sizes the worker group with them applied."""
    root = _copy_repo_inputs(tmp_path)
    config = yaml.safe_load((root / k8s.GPU_VARIANT.config).read_text())
    # The docs' recipe: the whole block (policy included), with the new bounds.
    block = dict(config["applications"][0]["args"]["llm"]["autoscaling_config"])
    block.update(min_replicas=4, max_replicas=6, initial_replicas=4)
    overrides = [{"name": "LLMServer", "autoscaling_config": block}]
    config["applications"][0]["deployments"] = overrides
    (root / k8s.GPU_VARIANT.config).write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = k8s.render_rayservice(k8s.GPU_VARIANT, root).manifest
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 5  # the vision GPU and the overridden minimum of 4 LLM GPUs
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served["applications"][0]["deployments"] == overrides


def _gpu_llm_policy() -> dict:
    return load(k8s.GPU_VARIANT.config)["applications"][0]["args"]["llm"]["autoscaling_config"]["policy"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 5, "policy": "POLICY"}}, (1, 5)),
        ({"autoscaling_config": None, "num_replicas": 3}, (3, 3)),  # back to a fixed count
        ({"graceful_shutdown_timeout_s": 30}, (2, 8)),
    ],
)
def test_stage_demands_apply_serve_overrides_as_serve_does(override, expected):
    args = load(k8s.GPU_VARIANT.config)["applications"][0]["args"]
    if (override.get("autoscaling_config") or {}).get("policy") == "POLICY":
        override = {"autoscaling_config": {**override["autoscaling_config"], "policy": _gpu_llm_policy()}}
    demands = {d.stage: d for d in k8s.stage_demands(args, [{"name": "LLMServer", **override}])}
    assert (demands["llm"].min_replicas, demands["llm"].max_replicas) == expected
    assert demands["llm"].num_gpus == 1
    with pytest.raises(ValueError, match="no deployment named"):
        k8s.stage_demands(args, [{"name": "LLMServerr", "num_replicas": 1}])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Serve takes the block in place of the app's whole one: the GPU, CPUs and environment would go.
        ({"ray_actor_options": {"num_gpus": 0.5}}, "overrides ray_actor_options"),
        ({"ray_actor_options": {"num_cpus": 6}}, "overrides ray_actor_options"),
        # Serve keeps autoscaling and ignores the count.
        ({"num_replicas": 4}, "Serve ignores a fixed count"),
        # Serve would fall back to its default queue-length policy.
        ({"autoscaling_config": {"min_replicas": 4, "max_replicas": 6}}, "leaves out or changes"),
    ],
)
def test_overrides_serve_would_apply_differently_are_refused(override, message):
    """Measured against Serve 2.60's own override_deployment_info (review 2026-12-06): each of these was
    taken field by field here while Serve applied it otherwise, so the pods were sized for a cluster
    Serve would not build."""
    args = load(k8s.GPU_VARIANT.config)["applications"][0]["args"]
    with pytest.raises(ValueError, match=message):
        k8s.stage_demands(args, [{"name": "LLMServer", **override}])


# ---------------------------------------------------------------------------------------------
# Import paths and the CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("deployments.app:build_app", None),
        ("zipvl_ray.routing.autoscaling:KVDemandPolicy", None),
        (k8s.TRACING_EXPORTER_IMPORT_PATH, None),
        ("deployments.app:build_ap", "does not import: AttributeError"),
        ("zipvl_ray.no_such_module:x", "does not import: ModuleNotFoundError"),
        ("requests:get", "is not in the image's packages"),
    ],
)
def test_import_errors(path, fragment):
    errors = k8s.import_errors([("where", path)])
    if fragment is None:
        assert errors == []
    else:
        assert len(errors) == 1 and fragment in errors[0], errors


def test_imports_command_checks_the_configs(capsys):
    configs = [str(REPO_ROOT / variant.config) for variant in k8s.VARIANTS]
    assert k8s.main(["imports", *configs]) == 0
    assert "all import paths resolve" in capsys.readouterr().out


def _copy_repo_inputs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("configs", "k8s"):
        shutil.copytree(REPO_ROOT / name, root / name)
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_check_reports_a_hand_edited_manifest_and_render_repairs_it(tmp_path, capsys):
    root = _copy_repo_inputs(tmp_path)
    path = root / k8s.CPU_VARIANT.output
    path.write_text(path.read_text().replace("minReplicas: 1", "minReplicas: 3"))
    assert k8s.main(["check", "--root", str(root), "--crd-dir", str(tmp_path / "none")]) == 1
    assert "differs from a fresh render" in capsys.readouterr().out
    assert k8s.main(["render", "--root", str(root)]) == 0
    assert k8s.main(["check", "--root", str(root), "--crd-dir", str(tmp_path / "none")]) == 0


def test_check_reports_a_config_the_renderer_refuses_instead_of_crashing(tmp_path, capsys):
    root = _copy_repo_inputs(tmp_path)
    config = yaml.safe_load((root / k8s.GPU_VARIANT.config).read_text())
    config["applications"][0]["deployments"] = [{"name": "LLMServerr", "num_replicas": 1}]
    (root / k8s.GPU_VARIANT.config).write_text(yaml.safe_dump(config, sort_keys=False))
    assert k8s.main(["check", "--root", str(root), "--crd-dir", str(tmp_path / "none")]) == 1
    assert (
        "cannot render the manifests: deployments: no deployment named ['LLMServerr']"
        in capsys.readouterr().out
    )


def test_check_flags_a_missing_manifest(tmp_path):
    root = _copy_repo_inputs(tmp_path)
    (root / k8s.GPU_VARIANT.output).unlink()
    report = k8s.check_folder(root, crd_dir=None)
    assert report.errors[k8s.GPU_VARIANT.output] == ["missing: run `python -m zipvl_ray.k8s render`"]


def test_render_with_another_image_repository_writes_elsewhere(tmp_path, capsys):
    with pytest.raises(SystemExit):
        k8s.main(["render", "--image-repo", "ghcr.io/me/zipvl-ray"])
    assert k8s.main(["render", "--out", str(tmp_path), "--image-repo", "ghcr.io/me/zipvl-ray"]) == 0
    for variant in k8s.VARIANTS:
        manifest = yaml.safe_load((tmp_path / variant.output).read_text())
        images = {c["image"] for c in ray_containers(manifest)}
        assert images == {f"ghcr.io/me/zipvl-ray:{k8s.package_version()}{variant.image_tag_suffix}"}


def test_docs_cover_the_files_the_changes_and_the_tracing_env():
    docs = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    missing = [path for path in MANIFESTS if f"`{path}`" not in docs]
    missing += [name for name in k8s.TRACING_ENV if f"`{name}`" not in docs]
    missing += [value for value in k8s.TRACING_ENV.values() if value not in docs]
    missing += [path for path, _, _ in k8s.POD_SERVE_CONFIG_CHANGES if f"`{path}`" not in docs]
    missing += [
        text
        for text in (
            "python -m zipvl_ray.k8s render",
            "python -m zipvl_ray.k8s check",
            "helm install kuberay-operator",
            "-serve-svc",
            k8s.GPU_VARIANT.upgrade_strategy,
        )
        if text not in docs
    ]
    assert missing == []
