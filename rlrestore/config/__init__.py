"""The one typed configuration schema behind every rlrestore command.

A run is described by a YAML file plus ``key=value`` overrides (dotted keys, YAML values)::

    rlrestore train stage1 configs/tiny.yaml stage1_1.steps=50 ray.train_workers.num_actors=2

Every field has a type, a default and a description; unknown keys and bad values are rejected
with a message naming the key, the value and what is allowed.

The sections live in submodules by topic (``base``, ``policy``, ``data``, ``stage1``, ``stage2``,
``run``, ``renames``, ``loading``); every name is importable from ``rlrestore.config``.
"""

from rlrestore.config.base import ComponentSpec, ConfigError
from rlrestore.config.data import DataConfig, DegradationConfig, Range
from rlrestore.config.loading import (
    POLICY_SECTIONS,
    apply_overrides,
    describe_schema,
    load_config,
    parse_override,
    save_config,
)
from rlrestore.config.policy import (
    AnyPolicyConfig,
    FlowUNetConfig,
    PolicyBaseConfig,
    PolicyConfig,
    SamplerConfig,
    VLLMOptions,
)
from rlrestore.config.renames import RENAMED_KEYS, move_renamed_keys
from rlrestore.config.run import (
    DEFAULT_EVAL_METRICS,
    EvalConfig,
    LoggingConfig,
    RayConfig,
    RunConfig,
    ServeConfig,
)
from rlrestore.config.stage1 import (
    ActorGroupConfig,
    AutoencoderConfig,
    Component,
    EvalActorsConfig,
    OptimConfig,
    SemanticAlignmentConfig,
    Stage1Config,
    StageName,
    TextureAlignmentConfig,
)
from rlrestore.config.stage2 import (
    DEFAULT_GUARD_METRICS,
    DEFAULT_GUARD_THRESHOLDS,
    DEFAULT_REWARD_ACTOR,
    EVAL_TOTAL,
    ErrorPolicy,
    FaultConfig,
    GuardConfig,
    GuardRule,
    HeldOutEvalConfig,
    LearnerConfig,
    NFTConfig,
    OutputConfig,
    RewardErrorConfig,
    RewardSpec,
    RolloutConfig,
    SelectionConfig,
    Stage2Config,
    Stage2Resources,
    reward_group_key,
)

__all__ = [
    "DEFAULT_EVAL_METRICS",
    "DEFAULT_GUARD_METRICS",
    "DEFAULT_GUARD_THRESHOLDS",
    "DEFAULT_REWARD_ACTOR",
    "EVAL_TOTAL",
    "POLICY_SECTIONS",
    "RENAMED_KEYS",
    "ActorGroupConfig",
    "AnyPolicyConfig",
    "AutoencoderConfig",
    "Component",
    "ComponentSpec",
    "ConfigError",
    "DataConfig",
    "DegradationConfig",
    "ErrorPolicy",
    "EvalActorsConfig",
    "EvalConfig",
    "FaultConfig",
    "FlowUNetConfig",
    "GuardConfig",
    "GuardRule",
    "HeldOutEvalConfig",
    "LearnerConfig",
    "LoggingConfig",
    "NFTConfig",
    "OptimConfig",
    "OutputConfig",
    "PolicyBaseConfig",
    "PolicyConfig",
    "Range",
    "RayConfig",
    "RewardErrorConfig",
    "RewardSpec",
    "RolloutConfig",
    "RunConfig",
    "SamplerConfig",
    "SelectionConfig",
    "SemanticAlignmentConfig",
    "ServeConfig",
    "Stage1Config",
    "Stage2Config",
    "Stage2Resources",
    "StageName",
    "TextureAlignmentConfig",
    "VLLMOptions",
    "apply_overrides",
    "describe_schema",
    "load_config",
    "move_renamed_keys",
    "parse_override",
    "reward_group_key",
    "save_config",
]
