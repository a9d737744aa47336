"""Hybrid models whose SSM layers call only the IR ops."""

from .cache import PrefixCache, StateCache
from .config import HybridConfig, bench_config, demo_config
from .decoder import HybridModel
from .engine import Completion, Engine
from .loading import from_pretrained, from_state_dict, from_transformers, random_model
from .tp import ShardPlan, TensorParallel

__all__ = [
    "Completion",
    "Engine",
    "HybridConfig",
    "HybridModel",
    "PrefixCache",
    "ShardPlan",
    "StateCache",
    "TensorParallel",
    "bench_config",
    "demo_config",
    "from_pretrained",
    "from_state_dict",
    "from_transformers",
    "random_model",
]
