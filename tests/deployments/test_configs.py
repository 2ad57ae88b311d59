"""``configs/*.yaml`` against Ray's config schema (strictly: unknown keys are errors) and ``AppArgs``."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs, StageOptions, VisionStageOptions, build_app
from deployments.schema_check import unknown_keys
from zipvl_ray.models import builtin_model_names

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = ["zipvl.yaml", "zipvl-gpu.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_is_known_to_ray(name):
    config = load(name)
    assert unknown_keys(config, ServeDeploySchema) == []
    ServeDeploySchema.model_validate(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_args_validate_and_build(name):
    (app,) = load(name)["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    # args.zero_copy_tensors decides (the builder sets it per replica); an app-level variable would win.
    assert "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS" not in app["runtime_env"]["env_vars"]
    args = AppArgs.model_validate(app["args"])
    assert args.zero_copy_tensors
    # What Serve does at deploy time: validate ``args`` with the builder's annotation, then build.
    (parameter,) = inspect.signature(build_app).parameters.values()
    assert parameter.annotation is AppArgs
    application = build_app(parameter.annotation.model_validate(app["args"]))
    assert type(application).__name__ == "Application"


def test_cpu_config_fits_two_cores_with_a_builtin_model():
    args = AppArgs.model_validate(load("zipvl.yaml")["applications"][0]["args"])
    assert args.model in builtin_model_names()
    assert args.device == "cpu"
    # Fractions of a CPU: the three fit 2 cores (Ray's CPU count) and, on Kubernetes, stay off the head pod
    # (num-cpus 0), which a replica asking for 0 CPUs could land on.
    cpus = [s.num_cpus for s in (args.ingress, args.vision, args.llm)]
    assert all(c > 0 for c in cpus) and sum(cpus) <= 1
    assert load("zipvl.yaml")["http_options"]["host"] == "127.0.0.1"
    assert args.images.allowed_url_hosts == []


def test_gpu_config_runs_llava_next_on_several_gpu_replicas():
    args = AppArgs.model_validate(load("zipvl-gpu.yaml")["applications"][0]["args"])
    assert "llava-v1.6" in args.model
    assert args.device == "cuda" and args.dtype == "bfloat16"
    assert args.llm.num_gpus == 1
    # One engine per GPU, autoscaled on KV demand between several replicas.
    scaling = args.llm.autoscaling_config
    assert args.llm.num_replicas is None and scaling["min_replicas"] >= 2
    assert scaling["max_replicas"] > scaling["min_replicas"]
    assert scaling["policy"]["policy_function"].endswith(":KVDemandPolicy")
    assert args.vision.num_gpus and args.vision.num_gpus > 0


@pytest.mark.parametrize(
    "path, typo, expected",
    [
        (("applications", 0), "routeprefix", "applications[0].routeprefix"),
        (("http_options",), "prot", "http_options.prot"),
        ((), "proxy_locaton", "proxy_locaton"),
    ],
)
def test_strict_check_catches_misspelled_keys(path, typo, expected):
    config = copy.deepcopy(load("zipvl.yaml"))
    node = config
    for step in path:
        node = node[step]
    node[typo] = "x"
    ServeDeploySchema.model_validate(config)  # Ray itself accepts the typo...
    assert unknown_keys(config, ServeDeploySchema) == [expected]  # ...the strict check does not.


def test_strict_check_walks_deployment_overrides():
    config = copy.deepcopy(load("zipvl.yaml"))
    config["applications"][0]["deployments"] = [
        {
            "name": "LLMServer",
            "num_replica": 2,
            "autoscaling_config": {"min_replica": 1},
            "ray_actor_options": {"num_gpu": 1},
        }
    ]
    assert unknown_keys(config, ServeDeploySchema) == [
        "applications[0].deployments[0].num_replica",
        "applications[0].deployments[0].autoscaling_config.min_replica",
        "applications[0].deployments[0].ray_actor_options.num_gpu",
    ]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"modle": "tiny-llava"}, "modle"),
        ({"zipvl": {"tau": 2}}, "tau"),
        ({"zipvl": {"tua": 0.9}}, "tua"),
        ({"engine": {"max_model_len": 1}}, "max_model_len"),
        ({"images": {"max_image_bytes": 0}}, "max_image_bytes"),
        ({"images": {"allowed_url_hosts": ["http://x/"]}}, "allowed_url_hosts"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"device": "gpu"}, "unknown device 'gpu'"),  # was torch's error at every replica's start
        ({"device": "cuda"}, "vision.num_gpus"),  # Ray leaves GPU 0 visible, unreserved, to every replica
        ({"device": "cuda", "vision": {"num_gpus": 0.25}}, "llm.num_gpus"),
        ({"engine_class": "zipvl_ray.engine.AsyncLLMEngine"}, "module:Attribute"),
        ({"llm": {"num_gpu": 1}}, "num_gpu"),
        ({"llm": {"autoscaling_config": {"min_replica": 1}}}, "autoscaling_config.min_replica"),
        ({"llm": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}, "max_replicas"),
        ({"llm": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
        ({"llm": {"request_router_config": {"request_router_klass": "a:B"}}}, "request_router_klass"),
        ({"vision": {"max_batch_size": 32, "max_ongoing_requests": 8}}, "max_batch_size"),
    ],
)
def test_bad_args_fail_at_deploy_time_naming_the_key(args, fragment):
    with pytest.raises(ValidationError, match=fragment):
        AppArgs.model_validate(args)


def test_dtype_and_device_are_normalised():
    """``dtype: AUTO`` passed validation and failed at every replica's start (the loader compared "auto"
    exactly); both are stored lower-case now, and the loader takes any case."""
    from zipvl_ray.models import resolve_dtype

    args = AppArgs.model_validate({"dtype": "AUTO", "device": "CPU"})
    assert (args.dtype, args.device) == ("auto", "cpu")
    assert resolve_dtype("AUTO") is None
    gpu = AppArgs.model_validate({"device": "cuda:1", "vision": {"num_gpus": 0.5}, "llm": {"num_gpus": 1}})
    assert gpu.device == "cuda:1"


def test_stage_options_map_to_deployment_options():
    stage = StageOptions(
        num_replicas=3, num_cpus=0.5, num_gpus=1, max_ongoing_requests=16, env_vars={"A": "1"}
    )
    assert stage.deployment_options({"Z": "2"}) == {
        "num_replicas": 3,
        "max_ongoing_requests": 16,
        "ray_actor_options": {
            "num_cpus": 0.5,
            "num_gpus": 1,
            "runtime_env": {"env_vars": {"Z": "2", "A": "1"}},
        },
    }
    assert StageOptions().deployment_options({}) == {"ray_actor_options": {"runtime_env": {"env_vars": {}}}}
    # The vision stage accepts a whole batch at once unless told otherwise.
    assert VisionStageOptions(max_batch_size=16).deployment_options({})["max_ongoing_requests"] == 32
    assert AppArgs(zero_copy_tensors=False).env_vars() == {}


def test_docs_describe_every_app_argument():
    docs = (CONFIG_DIR.parent / "docs" / "serving.md").read_text()
    from zipvl_ray.api.images import ImageLimits

    missing = [name for name in AppArgs.model_fields if name != "images" and f"`{name}`" not in docs]
    missing += [f"images.{name}" for name in ImageLimits.model_fields if f"`images.{name}`" not in docs]
    missing += [name for name in VisionStageOptions.model_fields if f"`{name}`" not in docs]
    assert missing == []


@pytest.mark.parametrize(
    "block, typo, message",
    [
        (("llm", "request_router_config", "request_router_kwargs"), "max_queue_length", "max_queue_length"),
        (("llm", "autoscaling_config", "policy", "policy_kwargs"), "target_kv_utilisation", "target_kv_util"),
        (
            ("vision", "autoscaling_config", "policy", "policy_kwargs"),
            "target_per_replicas",
            "target_per_rep",
        ),
    ],
)
def test_router_and_policy_kwargs_are_checked_when_the_app_is_built(block, typo, message):
    """Serve validates neither: a router built lazily with a bad key would leave every call waiting."""
    args = copy.deepcopy(load("zipvl-gpu.yaml")["applications"][0]["args"])
    node = args
    for step in block:
        node = node[step]
    node[typo] = 1
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(args)


QUEUE = "zipvl_ray.routing.autoscaling:QueueLengthPolicy"
KV = "zipvl_ray.routing.autoscaling:KVDemandPolicy"


@pytest.mark.parametrize(
    "stage, policy, kwargs, refused",
    [
        ("vision", QUEUE, {"metric": "pending_images"}, None),
        ("vision", QUEUE, {"metric": "pending_requests"}, None),
        ("vision", QUEUE, {"metric": "image_tokens"}, "metric 'image_tokens' is not reported"),
        ("vision", QUEUE, {"metric": "num_waiting"}, "metric 'num_waiting' is not reported"),  # an LLM metric
        ("vision", KV, {}, "KVDemandPolicy needs KV metrics"),
        ("llm", QUEUE, {"metric": "num_waiting"}, None),
        ("llm", QUEUE, {"metric": "pending_images"}, "metric 'pending_images' is not reported"),
        ("llm", KV, {}, None),
        ("ingress", QUEUE, {}, None),  # Serve's ongoing requests
        ("ingress", QUEUE, {"metric": "num_waiting"}, "metric 'num_waiting' is not reported"),
        ("ingress", KV, {}, "KVDemandPolicy needs KV metrics"),
    ],
)
def test_a_policy_must_read_metrics_the_stage_reports(stage, policy, kwargs, refused):
    """A policy reading a metric the stage's replicas never report decides without metrics for good
    (never below the current target): refused when the app is built."""
    args = copy.deepcopy(load("zipvl-gpu.yaml")["applications"][0]["args"])
    args[stage].pop("num_replicas", None)
    scaling = args[stage].setdefault("autoscaling_config", {"min_replicas": 1, "max_replicas": 2})
    scaling["policy"] = {"policy_function": policy, "policy_kwargs": {**kwargs}}
    if refused is None:
        AppArgs.model_validate(args)
    else:
        with pytest.raises(ValidationError, match=refused):
            AppArgs.model_validate(args)


@pytest.mark.parametrize("name", ["zipvl.yaml", "zipvl-multi.yaml", "zipvl-gpu.yaml"])
def test_ingress_and_llm_drain_as_long_as_a_request_may_run(name):
    """The HTTP streams live in the ingress: a stopping ingress replica (a replacing redeploy, a scale-down)
    must wait for them as long as the LLM replicas wait for their requests, and both as long as
    ``request_timeout_s`` lets a request run (Serve's default is 20 s)."""
    args = AppArgs.model_validate(load(name)["applications"][0]["args"])
    timeout = load(name)["http_options"]["request_timeout_s"]
    assert args.ingress.graceful_shutdown_timeout_s == args.llm.graceful_shutdown_timeout_s == timeout
