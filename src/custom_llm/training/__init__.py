"""Training: config, optimizers, schedules, curriculum, checkpoints, one loop (loop.py), metrics, DDP.

    from custom_llm.training import TrainConfig, train
    result = train(model_config, TrainConfig(max_steps=100), "runs/demo", dataset, tokenizer)
"""

from .checkpoint import latest_checkpoint, save_checkpoint
from .config import TRAIN_PRESETS, TrainConfig, resolve_run_config
from .curriculum import CurriculumStage, CurriculumState, advance_reason, batch_lr_factor
from .loop import TrainingStopped, TrainResult, train, train_loop
from .optim import Lion, build_optimizer, param_groups
from .parts import TrainingParts, build_parts
from .plan import StepPlan, plan_step
from .schedules import lr_multiplier, warmup_cosine, warmup_stable_decay
from .state import TrainState

__all__ = ["CurriculumStage", "CurriculumState", "Lion", "StepPlan", "TRAIN_PRESETS", "TrainConfig", "TrainResult",
           "TrainState", "TrainingParts", "TrainingStopped", "advance_reason", "batch_lr_factor", "build_optimizer",
           "build_parts", "latest_checkpoint", "lr_multiplier", "param_groups", "plan_step", "resolve_run_config",
           "save_checkpoint", "train", "train_loop", "warmup_cosine", "warmup_stable_decay"]
