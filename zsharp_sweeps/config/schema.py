"""Structured-config schemas for every config group, and their range checks.

Why dataclasses: Hydra composes YAML from ``conf/``; merging the result onto these schemas
(``zsharp_sweeps.config.validate``) type-checks every value and runs each ``__post_init__``
range check *before* any data is loaded or any MLflow run is opened, so bad input fails fast
with a message that names the setting and what is allowed. A leaf: nothing of the package is
imported, so ``import zsharp_sweeps.config`` loads no torch; the registries (datasets,
models, optimizers) check their names against the ones named here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from zsharp_sweeps.config.checks import (
    BASE_OPTIMIZERS,
    DATASETS,
    FILTERS,
    KERNELS,
    MODELS,
    THRESHOLD_METHODS,
    ConfigError,
    check,
    check_one_of,
    check_percentile,
    check_rho,
    check_stats_streams,
)


def _check(ok: bool, setting: str, value: Any, allowed: str, hint: str = "") -> None:
    check(ok, setting, value, allowed, hint)


def _one_of(setting: str, value: str, options: tuple[str, ...]) -> None:
    check_one_of(value, options, setting)


def dataset_names() -> tuple[str, ...]:
    """Every valid ``data.name``: the datasets of the dataset table, then ``synthetic``,
    which imitates any of them."""
    return (*DATASETS, "synthetic")


@dataclass
class DataConfig:
    """Which dataset, how it is split, augmented and fed."""

    name: str = "cifar10"
    root: str = "data"
    download: bool = True
    batch_size: int = 128
    eval_batch_size: int = 512
    # Images held out of the training set for validation (the sweep objective).
    val_size: int = 5000
    # Use only the first N training images (after the split); None = all. For quick runs.
    train_subset: int | None = None
    # Resize images to this side length (None = native). Digits are 8x8 natively.
    image_size: int | None = None
    augment: bool = True
    crop_padding: int = 4
    hflip: bool = True
    cutout: int = 0
    # "device": whole dataset as tensors on the training device, augmentation batched there.
    # "torch": a standard torch DataLoader (for data too large for device memory).
    loader: str = "device"
    num_workers: int = 0
    # Only for name=synthetic: which dataset's shape to imitate, and how many images.
    synthetic_like: str = "cifar10"
    synthetic_size: int = 10000
    split_seed: int = 0

    def __post_init__(self) -> None:
        names = dataset_names()
        _one_of("data.name", self.name, names)
        _one_of("data.synthetic_like", self.synthetic_like, names[:-1])
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.val_size >= 0, "data.val_size", self.val_size, ">= 0 (number of images)")
        _check(
            self.train_subset is None or self.train_subset >= 1,
            "data.train_subset", self.train_subset, "null or >= 1",
        )
        _check(
            self.image_size is None or self.image_size >= 4,
            "data.image_size", self.image_size, "null or >= 4",
        )
        _check(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, ">= 0")
        _check(self.cutout >= 0, "data.cutout", self.cutout, ">= 0 (side length, 0 = off)")
        _one_of("data.loader", self.loader, ("device", "torch"))
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(self.synthetic_size >= 1, "data.synthetic_size", self.synthetic_size, ">= 1")


@dataclass
class ModelConfig:
    """Which architecture; ``params`` go to its constructor (e.g. depth, width, heads)."""

    name: str = "resnet20"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("model.name", self.name, MODELS)


# ----- optimizers: one schema per option of conf/optimizer/ --------------------------------
@dataclass
class OptimizerConfig:
    """What every optimizer has. Each optimizer's schema below adds its own settings, so a
    setting an optimizer does not have is refused, naming it (``optimizer.percentile`` for
    SAM). A setting several optimizers of one sweep share is given once as
    ``optimizer_shared.<key>`` (``zsharp_sweeps.config.validate``)."""

    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        _one_of("optimizer.name", self.name, tuple(OPTIMIZER_SCHEMAS))
        _check(
            self.lr > 0 and math.isfinite(self.lr), "optimizer.lr", self.lr, "a finite value > 0"
        )
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")

    @property
    def base_name(self) -> str:
        """The torch optimizer that takes the descent step: ``base`` for the SAM family, the
        optimizer itself otherwise."""
        return getattr(self, "base", self.name)

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check_sgd(cfg: Any) -> None:
    _check(0 <= cfg.momentum < 1, "optimizer.momentum", cfg.momentum, "[0, 1)")


def _check_adam(cfg: Any) -> None:
    _check(
        len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas),
        "optimizer.betas", list(cfg.betas), "two values in [0, 1)",
    )
    _check(cfg.eps > 0, "optimizer.eps", cfg.eps, "> 0")


@dataclass
class SGDConfig(OptimizerConfig):
    """Plain SGD with momentum (the baseline of the SAM replications)."""

    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sgd(self)


@dataclass
class AdamConfig(OptimizerConfig):
    """``torch.optim.Adam`` (coupled L2 decay: the ZSharp paper's "AdamW" baseline)."""

    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 5e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_adam(self)


@dataclass
class AdamWConfig(AdamConfig):
    """``torch.optim.AdamW`` (decoupled weight decay)."""

    name: str = "adamw"
    weight_decay: float = 5e-4


@dataclass
class SAMFamilyConfig(OptimizerConfig):
    """What every two-pass (SAM-family) optimizer has: its base optimizer and that base's
    settings (SGD's momentum and nesterov, Adam's betas and eps: the base is a setting), the
    radius ``rho``, and BatchNorm in the second (perturbed) pass: ``freeze`` (davda54/sam's
    advice) or ``update`` (the official ZSharp code's behaviour)."""

    name: str = "sam"
    base: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    rho: float = 0.05
    bn_second_pass: str = "freeze"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("optimizer.base", self.base, BASE_OPTIMIZERS)
        _check_sgd(self)
        _check_adam(self)
        check_rho(self.rho, "optimizer.rho", ConfigError)
        _one_of("optimizer.bn_second_pass", self.bn_second_pass, ("freeze", "update"))


@dataclass
class SAMConfig(SAMFamilyConfig):
    """SAM (Foret et al. 2021): e = rho * g / ||g||; ``adaptive``: davda54's adaptive SAM."""

    name: str = "sam"
    adaptive: bool = False


@dataclass
class ASAMConfig(SAMFamilyConfig):
    """ASAM (Kwon et al. 2021): T = |w| + eta on weights; rho 0.5, eta 0.01 as the ZSharp
    code runs it."""

    name: str = "asam"
    rho: float = 0.5
    eta: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.eta >= 0, "optimizer.eta", self.eta, ">= 0")


@dataclass
class FSAMConfig(SAMFamilyConfig):
    """Friendly-SAM (Li et al. 2024): ascent along g - sigma * m, m a running mean of g."""

    name: str = "fsam"
    sigma: float = 1.0
    lmbda: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.sigma >= 0, "optimizer.sigma", self.sigma, ">= 0")
        _check(0 <= self.lmbda < 1, "optimizer.lmbda", self.lmbda, "[0, 1)")


@dataclass
class ZSharpConfig(SAMFamilyConfig):
    """ZSharp: keep entries whose |z| is strictly above the ``percentile`` quantile. Its
    implementation (same kept entries whichever is chosen): the order-statistic method, CUDA
    side streams for per-tensor statistics, the kernels."""

    name: str = "zsharp"
    percentile: float = 0.95
    filter: str = "zscore"
    filter_seed: int = 0
    threshold_method: str = "auto"
    stats_streams: int = 8
    kernels: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_percentile(self.percentile, "optimizer.percentile", ConfigError)
        _one_of("optimizer.filter", self.filter, FILTERS)
        check_one_of(self.threshold_method, THRESHOLD_METHODS, "optimizer.threshold_method")
        check_stats_streams(self.stats_streams, "optimizer.stats_streams", ConfigError)
        check_one_of(self.kernels, KERNELS, "optimizer.kernels")


@dataclass
class SAMMagnitudeConfig(SAMFamilyConfig):
    """SAM's ascent; descent along ||g'|| * g / ||g|| (SGD's direction, SAM's magnitude)."""

    name: str = "sam_magnitude"


@dataclass
class SAMDirectionConfig(SAMFamilyConfig):
    """SAM's ascent; descent along ||g|| * g' / ||g'|| (SAM's direction, SGD's magnitude)."""

    name: str = "sam_direction"


#: Every ``optimizer.name``, with its schema: the bases first, then the SAM family. The
#: optimizer registry (zsharp_sweeps/optim/registry.py) refuses a builder for a name not here.
OPTIMIZER_SCHEMAS: dict[str, type[OptimizerConfig]] = {
    "sgd": SGDConfig, "adamw": AdamWConfig, "adam": AdamConfig,
    "sam": SAMConfig, "asam": ASAMConfig, "fsam": FSAMConfig, "zsharp": ZSharpConfig,
    "sam_magnitude": SAMMagnitudeConfig, "sam_direction": SAMDirectionConfig,
}
#: Every setting some optimizer has: what ``optimizer_shared`` may set.
OPTIMIZER_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(
    name for schema in OPTIMIZER_SCHEMAS.values() for name in schema.settings()
    if name != "name"))


def optimizer_config(name: str = "zsharp", **settings: Any) -> OptimizerConfig:
    """The schema of optimizer ``name`` with ``settings``; a setting it does not have is a
    ``ConfigError`` naming it and what it has."""
    _one_of("optimizer.name", name, tuple(OPTIMIZER_SCHEMAS))
    schema = OPTIMIZER_SCHEMAS[name]
    own = schema.settings()
    for key in settings:
        if key not in own:
            raise ConfigError(not_a_setting(name, key))
    return schema(name=name, **settings)


def not_a_setting(name: str, key: str) -> str:
    own = ", ".join(k for k in OPTIMIZER_SCHEMAS[name].settings() if k != "name")
    shared = (f" To give {key} to the optimizers of a sweep that have it, use "
              f"optimizer_shared.{key}." if key in OPTIMIZER_SETTINGS else "")
    return (f"optimizer.{key} is not a setting of optimizer {name!r}: its settings are "
            f"{own}.{shared}")


@dataclass
class HardwareConfig:
    """Where and how fast: device, precision and the speed switches the trainer honours."""

    device: str = "auto"
    # precision, channels_last, compile, cuda_graph: a value, or "auto" (conf/hardware/auto.yaml):
    # resolved per device before the run starts, explicit values win (training/hardware.py).
    precision: str = "fp32"
    channels_last: bool | str = False
    compile: bool | str = False
    # Capture the whole training step (both passes + optimizer) in one CUDA graph (CUDA,
    # fp32/bf16 only; re-captured when the lr changes). See zsharp_sweeps/graphs.py.
    cuda_graph: bool | str = False
    # compile=auto compiles on CUDA when the run trains at least this many steps.
    compile_min_steps: int = 20000
    # torch.compile/Triton cache directory, shared by runs and sweep workers (null:
    # $ZSHARP_COMPILE_CACHE, else ~/.cache/zsharp-sweeps/inductor; "off": torch's default).
    compile_cache: str | None = None
    # CPU threads for torch (0 = torch's default).
    num_threads: int = 0
    deterministic: bool = False
    # In a sweep: how many workers share one GPU. Worker i of a host runs on
    # cuda:(i // trials_per_gpu) % device_count for its whole life (hydra.sweeper.n_jobs
    # workers in all: set it to device_count x trials_per_gpu). 2 for short trials: one
    # worker's evaluation and logging overlap the other's training (docs/sweeps.md).
    trials_per_gpu: int = 1
    # In a sweep: optimizer steps each worker trains on a throwaway model before its first
    # trial, so cuDNN, CUDA graphs, Triton and compile are warm for every trial
    # (training/warmup.py). null: 8 on CUDA, 0 elsewhere; 0: off.
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "hardware.device", self.device, "auto, cpu, cuda, cuda:N or mps",
        )
        _one_of("hardware.precision", self.precision, ("fp32", "bf16", "fp16", "auto"))
        for name in ("channels_last", "compile", "cuda_graph"):  # true, false or auto
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
                value = value.lower() if value.lower() == "auto" else value.lower() == "true"
            _check(isinstance(value, bool) or value == "auto", f"hardware.{name}", value,
                   "true, false or auto")
            setattr(self, name, value)
        _check(self.compile_min_steps >= 0, "hardware.compile_min_steps", self.compile_min_steps,
               ">= 0")
        _check(self.num_threads >= 0, "hardware.num_threads", self.num_threads, ">= 0")
        _check(self.trials_per_gpu >= 1, "hardware.trials_per_gpu", self.trials_per_gpu, ">= 1")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "hardware.warmup_steps",
               self.warmup_steps, ">= 0, or null (8 on CUDA, 0 elsewhere)")


SCHEDULERS = ("none", "cosine", "step", "multistep")
KEEP_CHECKPOINTS = ("last", "best", "none")


@dataclass
class TrainerConfig:
    """The fit loop: how long, which schedule, what is evaluated."""

    epochs: int = 200
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    step_size: int = 30
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # Cap the steps per epoch (None = the whole epoch). For smoke tests and benchmarks.
    max_steps_per_epoch: int | None = None
    eval_test_every_epoch: bool = True
    progress: bool = True
    # Checkpoints (zsharp_sweeps/training/checkpoint.py): one at the end of every epoch, so a killed
    # run, or a sweep trial retried after its worker died, resumes where it stopped.
    checkpoint: bool = True
    # null: <the run's Hydra output dir>/checkpoints (no checkpoints outside a Hydra run).
    checkpoint_dir: str | None = None
    # A checkpoint file, or a directory (its latest checkpoint), to continue from.
    resume: str | None = None
    # What stays on disk once the run has finished: last, best (best val_acc epoch), none.
    keep_checkpoints: str = "last"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, ">= 1")
        _one_of("trainer.keep_checkpoints", self.keep_checkpoints, KEEP_CHECKPOINTS)
        _check(
            self.checkpoint_dir is None or bool(str(self.checkpoint_dir).strip()),
            "trainer.checkpoint_dir", self.checkpoint_dir, "null or a directory path",
        )
        _check(
            self.resume is None or bool(str(self.resume).strip()), "trainer.resume",
            self.resume, "null or the path of a checkpoint file or directory",
        )
        _one_of("trainer.scheduler", self.scheduler, SCHEDULERS)
        _check(self.warmup_epochs >= 0, "trainer.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.step_size >= 1, "trainer.step_size", self.step_size, ">= 1")
        _check(self.gamma > 0, "trainer.gamma", self.gamma, "> 0")
        _check(
            0 <= self.label_smoothing < 1, "trainer.label_smoothing", self.label_smoothing,
            "[0, 1)",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", self.grad_clip,
            "null or > 0",
        )
        _check(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "trainer.max_steps_per_epoch", self.max_steps_per_epoch, "null or >= 1",
        )


@dataclass
class SharpnessConfig:
    """Which sharpness metrics, on how many fixed training batches, how often."""

    sam: bool = True
    sam_every: int = 1
    rho: float = 0.05
    hessian_top_eig: bool = False
    hessian_trace: bool = False
    num_batches: int = 2
    batch_size: int = 128
    eig_iters: int = 100
    eig_tol: float = 1e-4
    trace_samples: int = 50

    def __post_init__(self) -> None:
        _check(self.sam_every >= 1, "sharpness.sam_every", self.sam_every, ">= 1")
        _check(self.rho > 0, "sharpness.rho", self.rho, "> 0")
        _check(self.num_batches >= 1, "sharpness.num_batches", self.num_batches, ">= 1")
        _check(self.batch_size >= 1, "sharpness.batch_size", self.batch_size, ">= 1")
        _check(self.eig_iters >= 1, "sharpness.eig_iters", self.eig_iters, ">= 1")
        _check(self.trace_samples >= 1, "sharpness.trace_samples", self.trace_samples, ">= 1")


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what they are called."""

    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlruns/mlflow.db.
    uri: str | None = None
    experiment: str = "zsharp-sweeps"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # Nest this run (a sweep: its parent run) under an existing MLflow run: how a verdict
    # keeps its stages' sweeps under one benchmark run. None: a top-level run.
    parent_run_id: str | None = None


PRUNERS = ("none", "median", "successive_halving", "hyperband")
OBJECTIVES = (
    "best_val_acc", "final_val_acc", "final_val_loss",
    "sharpness/sam", "sharpness/hessian_top_eig", "sharpness/hessian_trace",
)


@dataclass
class StudyConfig:
    """How a sweep's trials are judged: pruning and seeds. A trial's identity (its Optuna
    trial, device, parent run) is not config: the sweep worker hands it over explicitly
    (``zsharp_sweeps.training.context.RunContext``). Outside a sweep only ``n_seeds`` acts."""

    # Stop unpromising trials early from their per-epoch validation accuracy: none, median,
    # successive_halving, hyperband, or the import path of a custom optuna pruner class.
    pruner: str = "none"
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 1
    pruner_min_resource: int = 1
    pruner_reduction_factor: int = 3
    # Repeat each configuration over this many seeds (seed, seed+1, ...); objective = mean.
    n_seeds: int = 1
    # The search ranges the sweep configs (conf/sweep/) and the verdict (conf/verdict/) read,
    # in Hydra's Optuna-sweeper syntax: lr and lr_grid by base optimizer (optimizer.base: an
    # SGD range for SGD, an Adam range for Adam), rho and rho_grid by optimizer (each on its
    # paper's scale: ASAM's rho is ~10x SAM's). conf/study/default.yaml holds the values.
    spaces: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.pruner in PRUNERS or "." in self.pruner, "study.pruner", self.pruner,
            "one of " + ", ".join(PRUNERS) + ", or the import path of an optuna BasePruner "
            "subclass taking no arguments (e.g. mypkg.pruners.MyPruner)",
        )
        _check(self.pruner_startup_trials >= 0, "study.pruner_startup_trials",
               self.pruner_startup_trials, ">= 0")
        _check(self.pruner_warmup_epochs >= 0, "study.pruner_warmup_epochs",
               self.pruner_warmup_epochs, ">= 0")
        _check(self.pruner_min_resource >= 1, "study.pruner_min_resource",
               self.pruner_min_resource, ">= 1")
        _check(self.pruner_reduction_factor >= 2, "study.pruner_reduction_factor",
               self.pruner_reduction_factor, ">= 2")
        _check(self.n_seeds >= 1, "study.n_seeds", self.n_seeds, ">= 1")


@dataclass
class TrainConfig:
    """The whole resolved config of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=ZSharpConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = 52
    # Settings for whichever optimizer of a sweep or recipe has them (optimizer_shared.rho=0.1
    # over optimizer=choice(sgd,sam,zsharp): rho for sam and zsharp); validate applies them.
    optimizer_shared: dict[str, Any] = field(default_factory=dict)
    # What the run returns to a sweeper, in order (several = multi-objective). Validation
    # metrics only: the test set is reported, never tuned on.
    objectives: list[str] = field(default_factory=lambda: ["best_val_acc"])

    def __post_init__(self) -> None:
        _check(len(self.objectives) >= 1, "objectives", list(self.objectives), "a non-empty list")
        for name in self.objectives:
            _one_of("objectives", name, OBJECTIVES)
        for key in self.optimizer_shared:
            _check(key in OPTIMIZER_SETTINGS, f"optimizer_shared.{key}", self.optimizer_shared[key],
                   "a setting some optimizer has: " + ", ".join(OPTIMIZER_SETTINGS))


#: Each group's schema; the optimizer group has one per option (``OPTIMIZER_SCHEMAS``).
GROUP_SCHEMAS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "hardware": HardwareConfig,
    "trainer": TrainerConfig,
    "sharpness": SharpnessConfig,
    "tracking": TrackingConfig,
    "study": StudyConfig,
}
