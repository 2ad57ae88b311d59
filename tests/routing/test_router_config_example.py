"""configs/router-example.yaml: every key is one Serve and our own configs accept, and the paths import."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from deployments.app import StageOptions, VisionStageOptions
from deployments.schema_check import unknown_keys
from zipvl_ray.routing.autoscaling import KVDemandPolicy, QueueLengthPolicy
from zipvl_ray.routing.router import KVPackingRouter, KVRouterConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "router-example.yaml"


@pytest.fixture(scope="module")
def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


@pytest.mark.parametrize(("stage", "options"), [("llm", StageOptions), ("vision", VisionStageOptions)])
def test_stage_blocks_pass_the_apps_strict_check(example, stage, options):
    options.model_validate(example[stage])  # raises on unknown or invalid keys


def test_router_block_names_our_router_with_valid_kwargs(example):
    block = example["llm"]["request_router_config"]
    assert unknown_keys(block, RequestRouterConfig) == []
    config = RequestRouterConfig(**block)
    assert config.get_request_router_class() is KVPackingRouter
    assert KVRouterConfig(**block["request_router_kwargs"]).strategy == "pack"


@pytest.mark.parametrize(("stage", "policy_class"), [("llm", KVDemandPolicy), ("vision", QueueLengthPolicy)])
def test_autoscaling_blocks_resolve_to_our_policies(example, stage, policy_class):
    block = example[stage]["autoscaling_config"]
    assert unknown_keys(block, AutoscalingConfig) == []
    policy = _resolve_policy_callable(AutoscalingConfig(**block).policy)  # what Serve's controller does
    assert isinstance(policy, policy_class)


def test_blocks_also_fit_a_serve_config_deployment_override(example):
    config = {
        "applications": [
            {
                "name": "zipvl",
                "import_path": "deployments.app:build_app",
                "deployments": [
                    {
                        "name": "LLMServer",
                        "request_router_config": example["llm"]["request_router_config"],
                        "autoscaling_config": example["llm"]["autoscaling_config"],
                    }
                ],
            }
        ]
    }
    assert unknown_keys(config, ServeDeploySchema) == []
    ServeDeploySchema.model_validate(config)
