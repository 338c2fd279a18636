"""Frozen, typed specs: the validated form of a composed config.

The driver composes the Hydra config once, validates it into a :class:`RunSpec`, and ships that
to the workers. Nothing past this point reads a DictConfig. Each spec rejects impossible values
and contradictions itself, naming the keys involved, so errors surface before Ray starts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
# What Lightning's seed_everything and NumPy's legacy seeding accept, for every recipe kind.
MAX_SEED = 2**32 - 1
# The run lock's heartbeat period, and how many periods without one make a lock stale: a
# shorter timeout would take over the lock of a run that is alive (its next beat not due yet).
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_MIN_BEATS = 4


class Spec(BaseModel):
    """Base for specs: immutable, an unknown key is an error rather than silently ignored, and
    no float key accepts inf or nan."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class RecipeSpec(Spec):
    name: str = Field(description="short name, used in run folder names")
    module: str = Field(description="import path (recipes.digits) or a .py file of the recipe")
    kind: Literal["loop", "lightning"] = Field("loop", description="forge loop or Lightning")
    params: dict[str, Any] = Field(default_factory=dict, description="the recipe's Params")


class DataSpec(Spec):
    batch_size: PositiveInt = Field(64, description="per-worker batch size")
    loader_workers: NonNegInt = Field(0, description="DataLoader processes per worker")
    shuffle: bool = True
    drop_last: bool = True
    pin_memory: bool = False
    # File sources (forge.data): read with Ray Data, sharded over workers by Ray Train.
    source: str | None = Field(
        None,
        description="Parquet/CSV file, folder or glob, local or s3:// (S3 options from "
        "storage.*); null: the recipe's own data",
    )
    format: Literal["parquet", "csv"] | None = Field(
        None, description="file format; null: from the file extension"
    )
    columns: list[str] | None = Field(
        None, description="feature columns; null: every column but the label"
    )
    label: str | None = Field(None, description="label column of data.source")
    val_source: str | None = Field(None, description="validation files (like data.source)")
    val_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of data.source held out (seeded hash split)"
    )
    split_key: str | None = Field(
        None, description="column hashed for the val split; null: the whole row's values"
    )
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the val split's hash")
    contract: str | dict[str, Any] | None = Field(
        None, description="data contract: inline, or a YAML file (local or s3://)"
    )
    on_violation: Literal["fail", "warn", "drop"] = Field(
        "fail", description="contract violations: fail (exit 2), warn, or drop failing rows"
    )
    check_max_rows: PositiveInt | None = Field(
        None,
        description="check the contract on the first N rows only (very large data); null: all rows",
    )
    shuffle_buffer_rows: PositiveInt = Field(
        10_000, description="per-worker shuffle buffer of a file source (rows)"
    )

    @model_validator(mode="after")
    def _file_source_keys(self) -> DataSpec:
        if self.source is None:
            for key in ("format", "columns", "label", "val_source", "split_key", "contract"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"data.{key} applies to a file source, but data.source is null (the "
                        f"recipe's own data). Set data.source=<file, folder or glob>, or "
                        f"remove data.{key}"
                    )
            if self.val_fraction:
                raise ValueError(
                    "data.val_fraction applies to a file source, but data.source is null. "
                    "Set data.source, or use the recipe's own val setting (recipe.params)"
                )
        if self.val_source is not None and self.val_fraction:
            raise ValueError(
                f"data.val_source={self.val_source!r} and data.val_fraction={self.val_fraction}"
                " both choose validation data. Keep one (data.val_fraction=0 or "
                "data.val_source=null)"
            )
        if self.label is not None and self.columns and self.label in self.columns:
            raise ValueError(
                f"data.label={self.label!r} is also in data.columns (the features). Remove it "
                "from data.columns"
            )
        return self


class OptimSpec(Spec):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: float = Field(0.1, ge=0, le=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        # Adam's moment decay rates: torch.optim refuses anything outside [0, 1) on the workers.
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(
                f"optim.betas={list(value)}: each beta must be in [0, 1), e.g. "
                "optim.betas=[0.9,0.999]"
            )
        return value


StrategyName = Literal[
    "ddp",
    "fsdp",
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
]
Offload = Literal["none", "cpu", "nvme"]

# One spec for every strategy (the YAML of each `strategy=` option sets only its own keys); a
# key that belongs to another strategy is refused, so a typo'd combination never passes silently.
_COMMON_STRATEGY_KEYS = {"name", "activation_checkpointing", "block_classes"}
_DEEPSPEED_KEYS = {
    "offload_optimizer",
    "offload_params",
    "nvme_path",
    "train_batch_size",
    "zero_init",
}
STRATEGY_KEYS: dict[str, set[str]] = {
    "ddp": {"bucket_cap_mb", "find_unused_parameters", "gradient_as_bucket_view"},
    "fsdp": {"sharding"},
    **{
        name: _DEEPSPEED_KEYS
        for name in (
            "deepspeed_zero1",
            "deepspeed_zero2",
            "deepspeed_zero3",
            "deepspeed_zero3_offload",
        )
    },
}


class StrategySpec(Spec):
    """How workers share the model; ``strategy=<name>`` picks ``configs/strategy/<name>.yaml``."""

    name: StrategyName = Field("ddp", description="distribution strategy")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward (saves memory)"
    )
    block_classes: list[str] | None = Field(
        None,
        description="module class names that are the model's blocks (FSDP units, checkpointed,"
        " compiled); null: every child of an nn.ModuleList",
    )
    # ddp
    bucket_cap_mb: float = Field(25, gt=0, description="DDP gradient bucket size")
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    # fsdp
    sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="full_shard: params resharded after forward (ZeRO-3-like); shard_grad_op: "
        "kept until backward (ZeRO-2-like, more memory, fewer all-gathers)",
    )
    # deepspeed_*
    offload_optimizer: Offload = Field("none", description="ZeRO-Offload of optimizer state")
    offload_params: Offload = Field("none", description="ZeRO-3 parameter offload")
    nvme_path: str | None = Field(
        None, description="local NVMe folder for nvme offload (refused for now: unused)"
    )
    train_batch_size: PositiveInt | None = Field(
        None, description="DeepSpeed global batch; must equal data.batch_size x workers x accum"
    )
    zero_init: bool = Field(
        False,
        description="ZeRO-3: build the model partitioned (deepspeed.zero.Init), so no worker "
        "holds it whole; needs a recipe whose Recipe.model is a function",
    )

    @model_validator(mode="before")
    @classmethod
    def _offload_by_name(cls, data: Any) -> Any:
        # deepspeed_zero3_offload means offload, also when built in Python without its YAML.
        if isinstance(data, dict) and data.get("name") == "deepspeed_zero3_offload":
            data = {"offload_optimizer": "cpu", "offload_params": "cpu", **data}
        return data

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage of a ``deepspeed_*`` strategy, None for the others.

        Example:
            >>> StrategySpec(name="deepspeed_zero3_offload").zero_stage
            3
        """
        if not self.name.startswith("deepspeed_zero"):
            return None
        return int(self.name[len("deepspeed_zero")])

    @model_validator(mode="after")
    def _own_keys_only(self) -> StrategySpec:
        allowed = _COMMON_STRATEGY_KEYS | STRATEGY_KEYS[self.name]
        foreign = sorted(self.model_fields_set - allowed)
        if foreign:
            raise ValueError(
                f"strategy.{foreign[0]} is not an option of strategy={self.name} (its options: "
                f"{', '.join(sorted(allowed - {'name'}))}). Choose a strategy with the config "
                f"group (strategy={self.name}, not strategy.name={self.name}) so only its own "
                f"keys are set, or remove it (~strategy.{foreign[0]})"
            )
        stage = self.zero_stage
        if self.offload_params != "none" and stage != 3:
            raise ValueError(
                f"strategy.offload_params={self.offload_params} needs ZeRO-3 but "
                f"strategy={self.name} is stage {stage}: only ZeRO-3 partitions parameters. Use "
                "strategy=deepspeed_zero3_offload, or strategy.offload_params=none"
            )
        if self.zero_init and stage != 3:
            raise ValueError(
                f"strategy.zero_init=true builds the model partitioned, which only ZeRO-3 does, "
                f"but strategy={self.name} is stage {stage}. Use strategy=deepspeed_zero3, or "
                "strategy.zero_init=false"
            )
        if "nvme" in (self.offload_params, self.offload_optimizer):
            # DeepSpeed swaps NVMe-offloaded state out of memory (its tensors become empty);
            # forge's checkpoints read and restore ZeRO state in memory, and NVMe needs libaio,
            # which no machine forge is tested on has. Refuse rather than risk checkpoints that
            # miss optimizer state.
            raise ValueError(
                f"strategy.offload_optimizer={self.offload_optimizer} / strategy.offload_params="
                f"{self.offload_params}: NVMe offload is not supported yet (forge cannot "
                "checkpoint ZeRO state that DeepSpeed has swapped out to NVMe). Offload to CPU "
                "memory instead: strategy=deepspeed_zero3_offload"
            )
        return self


class ScalingSpec(Spec):
    num_workers: PositiveInt = Field(2, description="training worker processes")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(1, gt=0, description="GPUs per worker when use_gpu=true")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers' bundles on nodes: PACK fills few nodes (fast "
        "NCCL/gloo within a node), SPREAD spreads them out, STRICT_SPREAD one worker per node",
    )

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.use_gpu else "gloo"


Precision = Literal["32", "bf16", "fp16"]
# Lightning's spellings are accepted too, so users can paste what they know.
_PRECISION_ALIASES = {
    "32-true": "32",
    "fp32": "32",
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
    "16": "fp16",
}


class TrainerSpec(Spec):
    max_steps: PositiveInt | None = Field(300, description="optimizer steps to train")
    max_epochs: PositiveInt | None = Field(None, description="passes over the training data")
    precision: Precision = Field("32", description="32 | bf16 | fp16")
    accumulate_grad_batches: PositiveInt = 1
    gradient_clip_val: float | None = Field(None, gt=0)
    log_every_n_steps: PositiveInt = 10
    val_every_n_steps: NonNegInt = Field(100, description="0 validates only at the end")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 is unlimited")
    compile: bool = Field(False, description="torch.compile the model's blocks (forge loop)")
    on_nonfinite: Literal["fail", "skip"] = Field(
        "fail",
        description="a NaN/inf loss or gradient: fail (stop, naming the step) or skip the step",
    )
    profile_steps: tuple[PositiveInt, PositiveInt] | None = Field(
        None,
        description="[first, last] optimizer steps to run under torch.profiler on rank 0 (forge "
        "loop); summary, table and trace go to the run folder's profile/",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _normalize_precision(cls, value: Any) -> Any:
        # YAML reads `precision: 32` as an int; accept it and Lightning's names.
        value = str(value)
        return _PRECISION_ALIASES.get(value, value)

    @model_validator(mode="after")
    def _needs_a_limit(self) -> TrainerSpec:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError(
                "trainer.max_steps and trainer.max_epochs are both null, so training would never "
                "stop. Set one of them, e.g. trainer.max_steps=300"
            )
        if self.profile_steps is not None:
            first, last = self.profile_steps
            problem = None
            if first > last:
                problem = "its first step comes after its last"
            elif self.max_steps is not None and last > self.max_steps:
                problem = f"its last step is past trainer.max_steps={self.max_steps}"
            if problem:
                end = self.max_steps or last
                example = f"[{max(1, end - 7)},{end}]"
                raise ValueError(
                    f"trainer.profile_steps=[{first},{last}] is not a window of this run's "
                    f"optimizer steps: {problem}. Give [first,last] with 1 <= first <= last <= "
                    f"max_steps, e.g. trainer.profile_steps={example}"
                )
        return self

    @field_validator("profile_steps", mode="before")
    @classmethod
    def _two_steps(cls, value: Any) -> Any:
        # Checked here so that [10] or [0,5] get this message, not one about list items.
        if value is None:
            return value
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(items) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
        ):
            raise ValueError(
                f"trainer.profile_steps={value} is not [first,last], two optimizer steps >= 1 "
                "(1-based, both profiled), e.g. trainer.profile_steps=[10,15]; remove it "
                "(~trainer.profile_steps) to profile nothing"
            )
        return value


class StorageRetrySpec(Spec):
    max_attempts: PositiveInt = Field(8, description="tries per storage request")
    max_wait_s: float = Field(120, gt=0, description="seconds one request may spend retrying")


# Keys that look like credentials: those come from the AWS chain, never from a saved config.
_CREDENTIAL_KEYS = ("key", "secret", "token", "password", "credential", "access")


class StorageSpec(Spec):
    uri: str = Field("runs", description="local path, file://, s3://bucket/prefix, memory://")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; null: AWS")
    region: str | None = Field(None, description="S3 region; null: the AWS default chain")
    retry: StorageRetrySpec = StorageRetrySpec()
    on_outage: Literal["fail", "defer"] = Field(
        "fail", description="fail the run, or keep training and upload when storage is back"
    )
    outage_max_s: float = Field(3600, gt=0, description="defer: longest outage before failing")
    part_size_mb: int = Field(16, ge=5, le=5120, description="multipart part size (MiB)")
    max_concurrency: PositiveInt = Field(8, description="parallel part uploads/downloads")
    break_lock: bool = Field(False, description="take over the run folder's lock")
    lock_stale_after_s: float = Field(
        300,
        ge=LOCK_HEARTBEAT_S * LOCK_STALE_MIN_BEATS,
        description=f"resume=auto takes over a lock without heartbeat this long (the heartbeat "
        f"comes every {LOCK_HEARTBEAT_S:g} s)",
    )
    shared: bool = Field(
        False,
        description="a local storage.uri is a file system every node mounts at the same path "
        "(NFS, Lustre); without it a local path is refused on a multi-node cluster",
    )

    @field_validator("uri")
    @classmethod
    def _usable_uri(cls, value: str) -> str:
        from forge.checkpoint.storage import check_uri

        problem = check_uri(value)
        if problem:
            raise ValueError(f"storage.uri={problem}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields and any(w in key.lower() for w in _CREDENTIAL_KEYS):
                    raise ValueError(
                        f"storage.{key}: credentials are not configuration (a saved config must "
                        "never hold them). forge takes them from the standard AWS chain: "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance "
                        f"role. Remove it (~storage.{key})"
                    )
        return data

    @model_validator(mode="after")
    def _s3_options_need_s3(self) -> StorageSpec:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"storage.endpoint_url={self.endpoint_url!r} must start with http:// or https://"
            )
        is_s3 = self.uri.startswith(("s3://", "s3a://"))
        for name in ("endpoint_url", "region"):
            if getattr(self, name) is not None and not is_s3:
                raise ValueError(
                    f"storage.{name} is set but storage.uri={self.uri!r} is not an s3:// URI; "
                    f"it only applies to S3. Use storage.uri=s3://bucket/prefix, or "
                    f"storage.{name}=null"
                )
        return self


class CheckpointSpec(Spec):
    every_n_steps: NonNegInt = Field(100, description="0 saves only at the end")
    keep_last: PositiveInt | None = Field(3, description="committed checkpoints to keep")
    monitor: str | None = Field(None, description="metric that picks the best checkpoint")
    mode: Literal["min", "max"] = "min"
    keep_best: PositiveInt = Field(1, description="with monitor: the k best are kept too")
    async_upload: bool = Field(True, description="serialize and upload in the background")
    max_in_flight: PositiveInt = Field(
        2, description="checkpoints held in memory while uploading; more waits"
    )


class RaySpec(Spec):
    address: str | None = Field(None, description="null (embedded), auto, or an address")
    num_cpus: PositiveInt | None = Field(None, description="CPUs of the embedded cluster")

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        import re

        if value is None or value in ("auto", "local"):
            return value
        if not re.fullmatch(r"(ray://)?([^@/\s]+@)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}/?", value):
            raise ValueError(
                f"ray.address={value!r} is not a Ray address. Use null (an embedded Ray), auto "
                "(the cluster running on this machine), host:port (e.g. 10.0.0.5:6379) or "
                "ray://host:10001"
            )
        return value


class RunSpec(Spec):
    """One training run, fully validated. Built by :func:`forge.config.validate.to_run_spec`."""

    recipe: RecipeSpec
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    strategy: StrategySpec = StrategySpec()
    scaling: ScalingSpec = ScalingSpec()
    trainer: TrainerSpec = TrainerSpec()
    storage: StorageSpec = StorageSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    ray: RaySpec = RaySpec()
    seed: int = Field(0, ge=0, le=MAX_SEED, description=f"in [0, {MAX_SEED}]")
    resume: str | None = Field(None, description="null | auto | a checkpoint URI")
    run_name: str | None = None
    verbose: bool = False

    @model_validator(mode="after")
    def _cross_checks(self) -> RunSpec:
        if self.trainer.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "trainer.precision=fp16 needs scaling.use_gpu=true: fp16 mixed precision relies "
                "on CUDA loss scaling. On CPU use trainer.precision=bf16 or trainer.precision=32"
            )
        self._strategy_cross_checks()
        if self.trainer.on_nonfinite == "skip" and (
            self.recipe.kind == "lightning" or self.strategy.name.startswith("deepspeed")
        ):
            where = (
                "recipe.kind=lightning (Lightning steps the optimizer itself)"
                if self.recipe.kind == "lightning"
                else f"strategy={self.strategy.name} (the DeepSpeed engine steps inside backward)"
            )
            raise ValueError(
                f"trainer.on_nonfinite=skip is not supported with {where}: forge cannot drop a "
                "step there before it is taken. Use trainer.on_nonfinite=fail (the run stops at "
                "the first non-finite step, naming it), or strategy=ddp/fsdp with a forge-loop "
                "recipe"
            )
        if self.run_name is not None and (
            "/" in self.run_name or self.run_name in {"", ".", ".."} or "\0" in self.run_name
        ):
            raise ValueError(
                f"run_name={self.run_name!r} must be a single folder name (no '/'); "
                "use storage.uri to choose where runs go"
            )
        from forge.checkpoint.storage import check_uri, join

        if self.run_name is not None:
            problem = check_uri(join(self.storage.uri, self.run_name))
            if problem:
                raise ValueError(f"run_name={self.run_name!r}: {problem}")
        if self.resume not in (None, "auto"):
            problem = check_uri(self.resume)
            if problem:
                raise ValueError(f"resume={problem}")
        return self

    def _strategy_cross_checks(self) -> None:
        strategy, name = self.strategy, self.strategy.name
        if self.recipe.kind == "lightning":
            if name != "ddp" and not self.scaling.use_gpu:
                raise ValueError(
                    f"strategy={name} with recipe.kind=lightning needs scaling.use_gpu=true: "
                    "Lightning's FSDP and DeepSpeed strategies refuse the CPU accelerator. Use "
                    "strategy=ddp on CPU"
                )
            for key, on in (
                ("trainer.compile", self.trainer.compile),
                ("strategy.activation_checkpointing", strategy.activation_checkpointing),
            ):
                if on:
                    raise ValueError(
                        f"{key}=true applies to forge-loop recipes; recipe.kind=lightning "
                        "leaves the model to the LightningModule (compile or checkpoint there)"
                    )
            if self.trainer.profile_steps is not None:
                raise ValueError(
                    "trainer.profile_steps applies to forge-loop recipes; for recipe.kind="
                    "lightning profile inside the LightningModule (torch.profiler), or remove "
                    "trainer.profile_steps"
                )
        if strategy.train_batch_size is not None:
            per_step = self.scaling.num_workers * self.trainer.accumulate_grad_batches
            expected = self.data.batch_size * per_step
            if strategy.train_batch_size % per_step:
                raise ValueError(
                    f"strategy.train_batch_size={strategy.train_batch_size} does not divide over "
                    f"scaling.num_workers={self.scaling.num_workers} x "
                    f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} "
                    f"(={per_step}). Use a multiple of {per_step}, e.g. {expected}"
                )
            if strategy.train_batch_size != expected:
                raise ValueError(
                    f"strategy.train_batch_size={strategy.train_batch_size} means "
                    f"{strategy.train_batch_size // per_step} samples per worker and micro-step, "
                    f"but data.batch_size={self.data.batch_size}. Set "
                    f"data.batch_size={strategy.train_batch_size // per_step}, or remove "
                    "strategy.train_batch_size (forge derives it)"
                )


class LaunchPlan(Spec):
    """What the driver decided for one launch; everything a worker needs besides the RunSpec.

    Attributes:
        run_uri: The run folder (absolute path or URI) under ``storage.uri``.
        resume_from: A committed checkpoint to start from when the run folder has none yet.
        config_hash: sha256 of the training-relevant config, recorded in manifests.
        launch_time: ``time.time()`` when ``forge.train`` was called, for time-to-first-step.
        lock_token: The token of the driver's run lock; rank 0 commits only while the lock
            still holds it (:func:`forge.checkpoint.lock.commit_fence`). None: not fenced.
        resumed_checkpoint, resumed_step: The checkpoint the driver expects to resume.
        changes: Keys changed against that checkpoint's config, ``{key: [before, now]}``.
    """

    run_uri: str
    resume_from: str | None = None
    config_hash: str
    git_sha: str | None = None
    launch_time: float
    data_fingerprint: dict[str, Any] | None = None  # forge.data: recorded in every manifest
    data_table: Any = None  # forge.data.TableInfo of a file source (None: the recipe's data)
    lock_token: str | None = None
    resumed_checkpoint: str | None = None
    resumed_step: int | None = None
    changes: dict[str, list[Any]] = Field(default_factory=dict)
