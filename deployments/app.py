"""The Ray Serve application: ``deployments.app:build_app`` with typed, validated arguments.

``serve run configs/zipvl.yaml`` calls :func:`build_app` with the YAML's ``args:`` validated as
:class:`AppArgs` at deploy time (unknown or out-of-range keys fail the deploy with a message naming
them). Three deployments::

    HTTP -> OpenAIIngress --pixels--> VisionEncoder --features (object store)--+
                  |                                                            v
                  +--------------token ids + routing hints----------------> LLMServer --tokens--> ingress -> client

Python callers may inject the engine, encoder and processor loader (tests use fakes) with
:func:`build_application`.

No ``from __future__ import annotations`` here on purpose: Serve reads :func:`build_app`'s parameter
annotation as a class to validate ``args`` with it.
"""

import importlib
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from deployments.ingress import OpenAIIngress
from deployments.llm import LLMServer
from deployments.schema_check import unknown_keys
from deployments.vision import VISION_AUTOSCALING_METRIC_NAMES, VisionEncoderServer
from zipvl_ray.api.auth import AuthSettings
from zipvl_ray.api.images import ImageLimits
from zipvl_ray.api.server import ServingSettings
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.telemetry import TelemetrySettings

#: Set in every replica: torch tensors cross the object store without a copy (features, pixels).
ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}

DTYPE_NAMES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")


def _resolve(target: Any) -> Any:
    """A ``module:attr`` (or ``module.attr``) import path as Serve resolves it; other values as they are."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # Serve reports an import path it cannot load itself


class StageOptions(BaseModel):
    """Replicas and resources of one deployment (``None`` keeps Serve's default)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = Field(
        None, description="Fixed replica count, or 'auto' for Serve's default autoscaling. None: 1."
    )
    num_cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs reserved per replica. None: Ray's default (1). Use 0 on a small CPU machine.",
    )
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica (fractions share a GPU).")
    memory: int | None = Field(None, ge=0, description="Bytes of memory reserved per replica for scheduling.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica runs at once.")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests a caller may queue for this deployment before 503s (-1: no limit)."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config (checked strictly against Ray's AutoscalingConfig)."
    )
    request_router_config: dict[str, Any] | None = Field(
        None, description="Serve request_router_config (checked strictly against Ray's RequestRouterConfig)."
    )
    health_check_period_s: float | None = Field(
        None, gt=0, description="Seconds between Serve health checks."
    )
    health_check_timeout_s: float | None = Field(None, gt=0, description="Seconds a health check may take.")
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="Seconds a stopping replica waits for in-flight requests."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the replicas."
    )

    @model_validator(mode="after")
    def _check_serve_blocks(self) -> "StageOptions":
        from ray.serve.config import AutoscalingConfig, RequestRouterConfig

        for name, model in (
            ("autoscaling_config", AutoscalingConfig),
            ("request_router_config", RequestRouterConfig),
        ):
            block = getattr(self, name)
            if block is None:
                continue
            unknown = unknown_keys(block, model, name)
            if unknown:
                raise ValueError(f"unknown keys (misspelled?): {', '.join(unknown)}")
            model.model_validate(block)
        self._check_project_kwargs()
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            raise ValueError("set either num_replicas (a number) or autoscaling_config, not both")
        return self

    def _check_project_kwargs(self) -> None:
        """Validate the kwargs of the project's router and policies now: Serve builds a router lazily in each
        process holding a handle, and one that fails there leaves every call waiting."""
        from zipvl_ray.routing.autoscaling import KVDemandPolicy, QueueLengthPolicy
        from zipvl_ray.routing.router import KVPackingRouter, KVRouterConfig

        router = self.request_router_config or {}
        router_class = _resolve(router.get("request_router_class"))
        if isinstance(router_class, type) and issubclass(router_class, KVPackingRouter):
            KVRouterConfig(**(router.get("request_router_kwargs") or {}))
        policy = (self.autoscaling_config or {}).get("policy") or {}
        policy_class = _resolve(policy.get("policy_function"))
        if isinstance(policy_class, type) and issubclass(policy_class, KVDemandPolicy | QueueLengthPolicy):
            policy_class(**(policy.get("policy_kwargs") or {}))

    def check_policy_metrics(self, stage: str, reported: tuple[str, ...]) -> None:
        """Refuse a project policy that reads metrics ``stage``'s replicas do not report
        (``record_autoscaling_stats``): Serve would find none, and the policy would decide without metrics
        for good (never below the current target)."""
        from zipvl_ray.routing.autoscaling import KVDemandPolicy, QueueLengthPolicy

        policy = (self.autoscaling_config or {}).get("policy") or {}
        policy_class = _resolve(policy.get("policy_function"))
        if not isinstance(policy_class, type):
            return
        if issubclass(policy_class, KVDemandPolicy) and "kv_bytes_capacity" not in reported:
            raise ValueError(f"{stage}: KVDemandPolicy needs KV metrics, which only the llm stage reports")
        if issubclass(policy_class, QueueLengthPolicy):
            metric = (policy.get("policy_kwargs") or {}).get("metric")
            if metric is not None and metric not in reported:
                raise ValueError(
                    f"{stage}: QueueLengthPolicy metric {metric!r} is not reported by this stage's replicas; "
                    f"use one of {list(reported)} or leave it unset (ongoing requests)"
                )

    def deployment_options(self, env_vars: dict[str, str]) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options(...)``."""
        actor: dict[str, Any] = {"runtime_env": {"env_vars": {**env_vars, **self.env_vars}}}
        for key in ("num_cpus", "num_gpus", "memory", "accelerator_type"):
            value = getattr(self, key)
            if value is not None:
                actor[key] = value
        options: dict[str, Any] = {"ray_actor_options": actor}
        for key in (
            "num_replicas",
            "max_ongoing_requests",
            "max_queued_requests",
            "autoscaling_config",
            "request_router_config",
            "health_check_period_s",
            "health_check_timeout_s",
            "graceful_shutdown_timeout_s",
        ):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        return options


class VisionStageOptions(StageOptions):
    """The vision stage's replicas and resources, plus batching and the encoder cache."""

    max_batch_size: int = Field(8, ge=1, le=512, description="Most requests batched into one vision forward.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long a vision batch that is not full waits for more requests before its forward "
        "starts. 0 (the default): an idle encoder starts at once, and the requests that arrive while a "
        "forward runs form the next batch anyway.",
    )
    cache_size: int = Field(
        256, ge=0, description="Entries of the encoder's LRU cache per replica (0 disables it)."
    )
    cache_max_bytes: int | None = Field(
        None,
        ge=0,
        description="Bytes of image features the encoder cache may hold per replica (None: bounded by "
        "cache_size only). Set it for large models: an anyres LLaVA-NeXT image is up to ~24 MB of features.",
    )

    @model_validator(mode="after")
    def _check_batch_fits(self) -> "VisionStageOptions":
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches never fill"
            )
        return self

    def deployment_options(self, env_vars: dict[str, str]) -> dict[str, Any]:
        options = super().deployment_options(env_vars)
        # A replica must accept a whole batch at once, or batches never fill.
        options.setdefault("max_ongoing_requests", max(5, 2 * self.max_batch_size))
        return options


def _check_import_path(path: str) -> str:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected 'package.module:Attribute', got {path!r}")
    return path


def import_attr(path: str) -> Any:
    """``"package.module:Attribute"`` -> the attribute."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class AppArgs(BaseModel):
    """Arguments of the zipvl-ray Serve application (the ``args:`` of ``configs/zipvl.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "zipvl-tiny",
        min_length=1,
        description="Built-in model name (tiny-llava, zipvl-tiny, ...), local checkpoint directory or hub id.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as 'model' (default: the model value)."
    )
    dtype: str | None = Field(
        None, description="Weights dtype: auto, float32, float16, bfloat16 (None: the checkpoint's)."
    )
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1'... (None: CUDA when available).")
    zipvl: ZipVLConfig = Field(default_factory=ZipVLConfig, description="Server-side ZipVL defaults.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="KV pool and batching of each LLM replica."
    )
    images: ImageLimits = Field(
        default_factory=ImageLimits, description="Image limits and remote URL policy."
    )
    default_max_tokens: int = Field(256, ge=1, description="Generation budget when a request sets none.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest HTTP request body (413 above)."
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description=(
            "Most characters of message text in one conversation, refused (400) before the chat template and the "
            "tokenizer run. None: 32 x max_model_len, at most 1 MiB."
        ),
    )
    health_timeout_s: float = Field(5.0, gt=0, description="How long GET /health waits for each stage.")
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description=(
            "API-key authentication (Authorization: Bearer) on every route but /health: where the ingress "
            "reads the keys (an environment variable, ZIPVL_API_KEYS by default, or a file; on Kubernetes from "
            "a Secret). No keys found: no authentication, unless required (then the deploy fails)."
        ),
    )
    ingress: StageOptions = Field(default_factory=StageOptions, description="The HTTP ingress deployment.")
    vision: VisionStageOptions = Field(
        default_factory=VisionStageOptions, description="The vision deployment."
    )
    llm: StageOptions = Field(default_factory=StageOptions, description="The LLM deployment.")
    zero_copy_tensors: bool = Field(
        True,
        description="Set RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in every replica (tensors cross without a copy).",
    )
    engine_class: str = Field(
        "zipvl_ray.engine:AsyncLLMEngine", description="Engine class of the LLM stage ('module:Class')."
    )
    encoder_class: str = Field(
        "zipvl_ray.vision:VisionEncoder", description="Encoder class of the vision stage ('module:Class')."
    )
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings,
        description="Tracing (exporter, sampling), Prometheus metrics and log level of the replicas "
        "(docs/observability.md).",
    )

    @model_validator(mode="after")
    def _check_policy_metrics(self) -> "AppArgs":
        from zipvl_ray.routing.replica_stats import AUTOSCALING_METRIC_NAMES

        self.ingress.check_policy_metrics("ingress", ())  # the ingress reports no custom metric
        self.vision.check_policy_metrics("vision", VISION_AUTOSCALING_METRIC_NAMES)
        self.llm.check_policy_metrics("llm", AUTOSCALING_METRIC_NAMES)
        return self

    @model_validator(mode="after")
    def _check_gpus_reserved(self) -> "AppArgs":
        # Ray leaves CUDA visible to an actor that asked for no GPU (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO is
        # off by default): replicas told to use CUDA without num_gpus would share GPU 0 unaccounted for.
        if self.device is not None and self.device.startswith("cuda"):
            for stage in ("vision", "llm"):
                if not getattr(self, stage).num_gpus:
                    raise ValueError(
                        f"device {self.device!r} needs {stage}.num_gpus (1, or a fraction to share a GPU): "
                        "Ray reserves only the GPUs a replica asks for"
                    )
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_NAMES)}")
        return value.lower() if value is not None else None

    @field_validator("engine_class", "encoder_class")
    @classmethod
    def _check_paths(cls, value: str) -> str:
        return _check_import_path(value)

    @property
    def name(self) -> str:
        """The served model name."""
        return self.served_model_name or self.model

    def serving_settings(self) -> ServingSettings:
        """What the HTTP layer needs."""
        return ServingSettings(
            served_model_name=self.name,
            model_source=self.model,
            max_model_len=self.engine.max_model_len,
            default_max_tokens=self.default_max_tokens,
            zipvl=self.zipvl,
            images=self.images,
            max_request_bytes=self.max_request_bytes,
            max_prompt_chars=self.max_prompt_chars,
            health_timeout_s=self.health_timeout_s,
            auth=self.auth,
        )

    def env_vars(self) -> dict[str, str]:
        env = dict(ZERO_COPY_ENV) if self.zero_copy_tensors else {}
        env.update(self.telemetry.env_vars())
        return env


def build_application(
    args: AppArgs,
    *,
    engine_cls: type | None = None,
    encoder_cls: type | None = None,
    processor_loader: Callable[[str], Any] | None = None,
) -> Application:
    """The application, with optional injected engine and encoder classes and processor loader.

    Parameters
    ----------
    args : AppArgs
    engine_cls, encoder_cls : type, optional
        Override ``args.engine_class`` / ``args.encoder_class`` (which are imported otherwise).
    processor_loader : callable, optional
        ``model name -> processor`` used by the ingress.
    """
    engine_cls = engine_cls or import_attr(args.engine_class)
    encoder_cls = encoder_cls or import_attr(args.encoder_class)
    env = args.env_vars()
    vision = VisionEncoderServer.options(**args.vision.deployment_options(env)).bind(
        encoder_cls,
        args.model,
        dtype=args.dtype,
        device=args.device,
        cache_size=args.vision.cache_size,
        cache_max_bytes=args.vision.cache_max_bytes,
        max_batch_size=args.vision.max_batch_size,
        batch_wait_timeout_s=args.vision.batch_wait_timeout_s,
    )
    llm = LLMServer.options(**args.llm.deployment_options(env)).bind(
        engine_cls, args.model, dtype=args.dtype, device=args.device, zipvl=args.zipvl, engine=args.engine
    )
    return OpenAIIngress.options(**args.ingress.deployment_options(env)).bind(
        vision, llm, args.serving_settings(), args.model, processor_loader
    )


def build_app(args: AppArgs) -> Application:
    """Serve application builder (``import_path: deployments.app:build_app``)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    return build_application(args)


__all__ = ["AppArgs", "StageOptions", "VisionStageOptions", "build_app", "build_application"]
