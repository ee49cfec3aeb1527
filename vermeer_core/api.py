"""The public plugin API: everything a vermeer plugin imports, from one module.

Built-in plugins (``vermeer_plugins``) import only from here, like a third party's::

    from vermeer_core.api import ComponentConfig, GrowthContext, PhaseConfig, Transfer, hookimpl

Names exported here stay stable; anything else in ``vermeer_core`` may change. Hooks are
documented in :mod:`vermeer_core.hookspecs`, what each component kind provides (factory
Protocols, the objects they return) in :mod:`vermeer_core.interfaces`, and the contract of a
growth policy (what ``prev`` holds, transfers, phases) in :class:`GrowthPolicy`.
"""

from __future__ import annotations

from vermeer_core.diffusion import alpha_sigma, noise_like
from vermeer_core.errors import DataError, VermeerError
from vermeer_core.hookspecs import hookimpl
from vermeer_core.io import LOCAL_PROTOCOLS, StorageError, atomic_write_bytes, is_local_fs, is_local_url, storage_errors
from vermeer_core.interfaces import (
    AttentionFactory,
    AttentionFn,
    Batch,
    BlockFactory,
    BlockFamily,
    CoreFactory,
    DataStream,
    DatasetFactory,
    Denoiser,
    EvalPrompt,
    GrowthPolicy,
    GrowthPolicyFactory,
    NoiseSchedule,
    Metric,
    NoiseScheduleFactory,
    ParamMatch,
    Phase,
    Preconditioning,
    Sampler,
    SamplerCallback,
    SamplerFactory,
    TextEmbedding,
    TextEncoderFactory,
    Trainable,
)
from vermeer_core.model import CORE_MODULES, GrowthContext, ModelBuilder, VermeerModel
from vermeer_core.phases import ALIASES, ParamGroup, PhaseConfig, PhaseError, TrainableEntry, check_phase_names
from vermeer_core.registry import ComponentConfig, Registry
from vermeer_core.sampling import save_grid
from vermeer_core.spec import RunSpec
from vermeer_core.transfer import Transfer, TransferError, TransferMap

__all__ = [
    # hooks and registration
    "hookimpl",
    "ComponentConfig",
    "Registry",
    "RunSpec",
    # growth
    "ALIASES",
    "CORE_MODULES",
    "GrowthContext",
    "GrowthPolicy",
    "ModelBuilder",
    "ParamGroup",
    "ParamMatch",
    "Phase",
    "Preconditioning",
    "PhaseConfig",
    "PhaseError",
    "Trainable",
    "TrainableEntry",
    "Transfer",
    "TransferError",
    "TransferMap",
    "VermeerModel",
    "check_phase_names",
    # component interfaces and factory Protocols
    "AttentionFactory",
    "AttentionFn",
    "Batch",
    "BlockFactory",
    "BlockFamily",
    "CoreFactory",
    "DataStream",
    "DatasetFactory",
    "EvalPrompt",
    "Metric",
    "Denoiser",
    "GrowthPolicyFactory",
    "NoiseSchedule",
    "NoiseScheduleFactory",
    "Sampler",
    "SamplerCallback",
    "SamplerFactory",
    "TextEmbedding",
    "TextEncoderFactory",
    # helpers components share
    "DataError",
    "VermeerError",
    "alpha_sigma",
    "noise_like",
    "save_grid",
    # storage through fsspec (shard readers/writers: vermeer_plugins.shards)
    "LOCAL_PROTOCOLS",
    "StorageError",
    "atomic_write_bytes",
    "is_local_fs",
    "is_local_url",
    "storage_errors",
]
