"""The typed configuration: Hydra composes ``configs/`` onto these dataclasses, so an unknown key or a value of
the wrong type fails at start with one line naming it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class TaskConfig:
    name: str = "digits"            # digits | synthetic | cifar10 | imagenet | wmt16
    label_smoothing: float = 0.0    # wmt16: 0.1 (fairseq's label_smoothed_cross_entropy)
    beam: int = 1                   # wmt16 decoding: 1 = greedy
    max_decode_len: int = 64        # wmt16: extra target tokens beyond the source length


@dataclass
class DataConfig:
    root: Optional[str] = None      # dataset directory (native on-disk format); digits needs none
    batch_size: int = 32            # per rank (images) ; wmt16 uses max_tokens
    eval_batch_size: int = 256
    max_tokens: int = 4096          # wmt16: tokens per rank per batch
    num_workers: int = 0            # DataLoader worker processes per rank (0: load on the training thread)
    prefetch_factor: int = 2        # batches each worker loads ahead
    augment: bool = True
    download: bool = False          # cifar10: fetch when online
    verify_checksums: bool = True   # cifar10: torchvision's MD5 check of the batch files
    vocab_size: int = 8000          # wmt16: joint sentencepiece BPE vocabulary
    spm_model: Optional[str] = None  # wmt16: an existing sentencepiece model (else trained on train.*)
    image_size: int = 224           # imagenet crop
    val_fraction: float = 0.2       # digits: held-out share


@dataclass
class ModelConfig:
    name: str = "mlp"               # mlp | cnn | resnet20 | resnet18 | resnet50 | transformer_*
    width: int = 64                 # mlp/cnn hidden width; resnet base width (64 = the standard ResNet-18)
    dropout: float = 0.0


@dataclass
class AlgorithmConfig:
    name: str = "localsgd"          # allreduce | localsgd | sgp | osgp
    period: Optional[int] = None    # localsgd: H (None: only SlowMo's exact average)
    graph: str = "directed_exponential"
    procs_per_node: int = 1


@dataclass
class SlowMoConfig:
    enabled: bool = False
    tau: int = 12
    alpha: float = 1.0
    beta: float = 0.0
    nesterov: bool = False
    base_buffers: str = "keep"      # keep | reset | average
    shard_outer_state: bool = False
    pseudo_gradient: str = "scaled"  # scaled (SlowMo) | raw (BMUF / DiLoCo)


@dataclass
class OptimizerConfig:
    name: str = "sgd"               # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    name: str = "step"              # constant | step | inverse_sqrt
    warmup_epochs: float = 0.0      # linear warm-up (step schedule), in epochs
    warmup_steps: int = 0           # linear warm-up in steps (inverse_sqrt)
    warmup_init_lr: float = 0.0     # lr at step 0 of the warm-up, as a fraction of optimizer.lr
    milestones: list[float] = field(default_factory=list)  # epochs at which lr *= gamma
    gamma: float = 0.1


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "slowmo"
    group: Optional[str] = None     # default: the sweep's name, or the run directory's parent
    name: Optional[str] = None      # default: the run's overrides
    mode: str = "auto"              # auto (online with an API key, else offline) | online | offline
    log_every: int = 10
    progress: bool = True


@dataclass
class DistConfig:
    backend: str = "simulated"      # simulated | gloo | nccl
    device: str = "auto"            # auto (the local GPU under nccl, else the CPU) | cpu | cuda
    world_size: int = 4             # ranks to simulate or to spawn locally (ignored under torchrun/srun)
    timeout_s: float = 300.0


@dataclass
class TrainConfig:
    max_steps: int = 200
    eval_every: int = 50
    checkpoint_every: int = 0       # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    resume: str = "auto"            # auto: newest valid checkpoint in the run dir | never
    signal_check_every: int = 5     # steps between checks for SIGTERM/SIGUSR1 (ranks agree on stopping)
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast; fp16 adds a loss scaler agreed by all ranks)
    channels_last: Optional[bool] = None  # ResNets in channels-last memory format; None: on for cuda
    deterministic: bool = False     # deterministic CUDA kernels (bit-exact resume on GPUs), no cudnn.benchmark


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    slowmo: SlowMoConfig = field(default_factory=SlowMoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    experiment: Optional[str] = None  # the preset's name, recorded in the run


ConfigStore.instance().store(name="schema", node=Config)

CHOICES = {
    "task.name": ("digits", "synthetic", "cifar10", "imagenet", "wmt16"),
    "algorithm.name": ("allreduce", "localsgd", "sgp", "osgp"),
    "algorithm.graph": ("directed_exponential", "ring", "complete"),
    "slowmo.base_buffers": ("keep", "reset", "average"),
    "slowmo.pseudo_gradient": ("scaled", "raw"),
    "optimizer.name": ("sgd", "adam", "adamw"),
    "schedule.name": ("constant", "step", "inverse_sqrt"),
    "logger.mode": ("auto", "online", "offline"),
    "dist.backend": ("simulated", "gloo", "nccl"),
    "dist.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line."""


def validate(cfg: DictConfig | dict[str, Any]) -> Config:
    """Merge onto the schema and check the choices; raises :class:`ConfigError` with one line."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        detail = str(error).splitlines()[0]
        raise ConfigError(f"bad config{f' key {key!r}' if key else ''}: {detail}") from None
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        value = getattr(getattr(config, group), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    if config.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1, got {config.train.max_steps}")
    if config.dist.world_size < 1:
        raise ConfigError(f"dist.world_size must be >= 1, got {config.dist.world_size}")
    if config.train.eval_every < 0 or config.train.checkpoint_every < 0:
        raise ConfigError("train.eval_every and train.checkpoint_every must be >= 0 (0 disables)")
    if config.experiment and config.experiment.startswith("paper_") and config.experiment[6:] != config.task.name:
        raise ConfigError(f"+experiment={config.experiment} is the preset of task {config.experiment[6:]}, but the task "
                          f"is {config.task.name}; run experiments/{config.experiment[6:]}/train.py")
    if config.dist.backend == "nccl" and config.dist.device == "cpu":
        raise ConfigError("dist.backend=nccl moves only GPU tensors but dist.device=cpu; use dist.device=cuda (or auto), "
                          "or dist.backend=gloo to train on the CPU")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0 loads batches on the training thread), got "
                          f"{config.data.num_workers}")
    if config.data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor must be >= 1 (batches each worker loads ahead), got "
                          f"{config.data.prefetch_factor}")
    if config.train.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume must be 'auto' or 'never', got {config.train.resume!r}")
    return config
