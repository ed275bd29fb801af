"""Experiment configuration: pydantic models that mirror the YAML files in `configs/` one to one
(`sections`), and reading them (`loading`).

Every error names the YAML path of the field it is about (`gistnet.training.phases[1].max_steps: ...`),
so a researcher can fix a config without reading this package. Relative paths in a config resolve
against the project root it was loaded with (`load_config(path, root)`).
"""

from mcx_core.config.loading import ConfigError, check_files, load_config, parse_config  # noqa: F401
from mcx_core.config.sections import (  # noqa: F401  (re-exported: the section models)
    EMBEDDED_SOURCES,
    AcceptanceConfig,
    AlertsConfig,
    AllocatorConfig,
    BaseModelConfig,
    CorpusConfig,
    DatasetConfig,
    DeltasConfig,
    EvaluationConfig,
    GistNetConfig,
    GistNetModelConfig,
    GistNetTrainingConfig,
    LensNetConfig,
    LensNetModelConfig,
    LensNetTrainingConfig,
    LoRAConfig,
    LoRATrainingConfig,
    MegaContextConfig,
    MLflowConfig,
    PhaseConfig,
    RuntimeConfig,
    Section,
    SplitSource,
    SweepConfig,
    TinyModelConfig,
    TrainingConfig,
    TrainingLoopConfig,
    WorkingContextConfig,
    flatten,
    project_root,
    resolve_path,
)
