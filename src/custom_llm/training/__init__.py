"""Training: config, optimizers, schedules, curriculum, checkpoints, the loop, metrics, DDP.

    from custom_llm.training import TrainConfig, train
    result = train(model_config, TrainConfig(max_steps=100), "runs/demo", dataset, tokenizer)
"""

from .checkpoint import latest_checkpoint, save_checkpoint
from .config import TRAIN_PRESETS, TrainConfig, resolve_run_config
from .curriculum import CurriculumStage, CurriculumState, advance_reason, batch_lr_factor
from .optim import Lion, build_optimizer, param_groups
from .schedules import lr_multiplier, warmup_cosine, warmup_stable_decay
from .trainer import Trainer, TrainingStopped, TrainResult, train

__all__ = ["CurriculumStage", "CurriculumState", "Lion", "TRAIN_PRESETS", "TrainConfig", "TrainResult", "Trainer",
           "TrainingStopped", "advance_reason", "batch_lr_factor", "build_optimizer", "latest_checkpoint",
           "lr_multiplier", "param_groups", "resolve_run_config", "save_checkpoint", "train", "warmup_cosine",
           "warmup_stable_decay"]
