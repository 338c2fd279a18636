"""DeepSpeed ZeRO stages 1, 2 and 3, with optional offload of optimizer state and parameters.

forge's config becomes DeepSpeed's (:func:`deepspeed_config`): ``data.batch_size`` ->
``train_micro_batch_size_per_gpu``, ``trainer.accumulate_grad_batches`` ->
``gradient_accumulation_steps``, ``trainer.gradient_clip_val`` -> ``gradient_clipping``,
``trainer.precision`` -> the ``bf16``/``fp16`` sections, ``strategy=`` -> ``zero_optimization``.

The engine counts micro-batches and steps at accumulation boundaries itself, so
:meth:`DeepSpeedStrategy.backward` runs ``engine.backward`` + ``engine.step`` on every
micro-batch and ``optimizer_step`` does nothing; the optimizer is forge's own torch optimizer
(``torch_adam``; DeepSpeedCPUAdam when the optimizer state is offloaded), which DeepSpeed wraps,
so the loop's LambdaLR schedule keeps driving its learning rate.

Checkpoints: every rank writes the fp32 master weights and optimizer state it owns, per
parameter, in forge's sharded format (:mod:`forge.strategies.fragments`) - the same content as a
DeepSpeed *universal* checkpoint, written directly, without pickles. Loading reads the ranges
this rank owns under the current layout, so any world size works, and DDP or FSDP checkpoints
load too. :func:`engine_fragments` and :func:`load_engine_state` do this for any ZeRO engine;
the Lightning path's DeepSpeed strategy (:mod:`forge.strategies.deepspeed_files`) uses them
as well. This reaches into the ZeRO optimizers' partition tables (``_hp_mapping``,
``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``), checked with
deepspeed 0.19; the unit tests cover every stage.

``strategy.zero_init=true`` (ZeRO-3) builds the recipe's model inside ``deepspeed.zero.Init``
(:meth:`DeepSpeedStrategy.init_context`), so no worker ever holds it whole.

Not here: NVMe offload (state DeepSpeed swaps out to NVMe is not in memory for
these checkpoints to read; ``StrategySpec`` refuses ``nvme`` before launch).
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import RunSpec
from forge.errors import CheckpointError, ConfigError
from forge.precision import autocast
from forge.strategies import FilePayload, OptimizerFactory, ensure_process_group
from forge.strategies.fragments import ShardWriter, StateReader, jsonable, tied_names
from forge.strategies.modules import prepare

_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_config(spec: RunSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config that ``spec`` means on ``world_size`` workers.

    Example:
        >>> from forge.config.specs import RecipeSpec, StrategySpec, TrainerSpec
        >>> spec = RunSpec(recipe=RecipeSpec(name="d", module="recipes.digits"),
        ...                strategy=StrategySpec(name="deepspeed_zero2"),
        ...                trainer=TrainerSpec(accumulate_grad_batches=2, gradient_clip_val=1.0))
        >>> cfg = deepspeed_config(spec, world_size=2)
        >>> cfg["train_batch_size"], cfg["zero_optimization"]["stage"], cfg["gradient_clipping"]
        (256, 2, 1.0)
    """
    strategy, trainer = spec.strategy, spec.trainer
    micro, accumulation = spec.data.batch_size, trainer.accumulate_grad_batches
    zero: dict[str, Any] = {"stage": strategy.zero_stage}
    for key, where in (
        ("offload_optimizer", strategy.offload_optimizer),
        ("offload_param", strategy.offload_params),
    ):
        if where != "none":  # "cpu": StrategySpec refuses nvme for now
            zero[key] = {"device": where, "pin_memory": spec.scaling.use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": trainer.gradient_clip_val or 0.0,
        "zero_optimization": zero,
        # forge logs and times steps itself.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # forge's optimizers (AdamW, Adam, SGD) are plain torch ones; SGD is "untested" to ZeRO.
        "zero_allow_untested_optimizer": True,
    }
    if strategy.offload_optimizer != "none" and spec.optim.name == "sgd":
        config["zero_force_ds_cpu_optimizer"] = False  # no DeepSpeed CPU SGD: torch's runs on CPU
    if trainer.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif trainer.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


class DeepSpeedStrategy:
    """One of ``deepspeed_zero1``, ``deepspeed_zero2``, ``deepspeed_zero3[_offload]``."""

    def __init__(self, spec: RunSpec, rank: int, world_size: int, device: torch.device) -> None:
        self.spec = spec
        self.name = spec.strategy.name
        self.stage = spec.strategy.zero_stage
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def _prepare(self) -> None:
        ensure_process_group(self.device)
        # DeepSpeed reads its place from the launcher's variables; Ray sets them for several
        # workers, a single worker (or a unit test) may not have them.
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0))
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)

    def init_context(self) -> AbstractContextManager[Any]:
        if not self.spec.strategy.zero_init:
            return nullcontext()
        self._prepare()
        import deepspeed

        # deepspeed.initialize() would attach DeepSpeed to the process group later; zero.Init
        # needs it now (else it sees a world of one and partitions nothing across workers).
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            verbose=False,
            dist_init_required=False,
        )
        # Every parameter is partitioned as soon as its module is built, after rank 0's values
        # are broadcast, so the run starts from the same weights as under any other strategy.
        # Module.apply() inside the build sees whole (gathered) parameters; other code that
        # changes parameters after their module was built does not (see forge.Recipe).
        offload = self.spec.strategy.offload_params != "none"
        return deepspeed.zero.Init(
            config_dict_or_path=deepspeed_config(self.spec, self.world_size),
            remote_device="cpu" if offload else None,
            pin_memory=offload and self.spec.scaling.use_gpu,
        )

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._prepare()
        import deepspeed

        if not self.spec.strategy.zero_init:  # built partitioned: already where ZeRO wants it
            model = model.to(self.device)
        # Activation checkpointing before DeepSpeed wraps the model; compile after, with
        # engine.compile(), so ZeRO-3's parameter hooks stay outside the compiled graphs.
        prepare(
            model,
            activation_checkpointing=self.spec.strategy.activation_checkpointing,
            compile_model=False,
            block_classes=self.spec.strategy.block_classes,
        )
        optimizer = self._optimizer(model, make_optimizer)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(self.spec, self.world_size),
            dist_init_required=False,
        )
        if self.spec.trainer.compile:
            engine.compile()
        # The torch optimizer DeepSpeed steps: the loop's LR schedule sets its param groups' lr.
        return engine, optimizer

    def _optimizer(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> torch.optim.Optimizer:
        optim = self.spec.optim
        if self.spec.strategy.offload_optimizer == "none" or optim.name == "sgd":
            return make_optimizer(model.parameters())
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                model.parameters(),
                lr=optim.lr,
                betas=optim.betas,
                eps=optim.eps,
                weight_decay=optim.weight_decay,
                adamw_mode=optim.name == "adamw",
            )
        except Exception as exc:  # the C++ op is built on first use and can fail to
            raise ConfigError(
                f"strategy.offload_optimizer={self.spec.strategy.offload_optimizer} steps the "
                "optimizer on the CPU with DeepSpeedCPUAdam, whose C++ op could not be built "
                f"here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "It needs a C++ compiler and ninja on every worker; or use strategy="
                "deepspeed_zero3 (no offload)."
            ) from None

    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]:
        return nullcontext()  # the engine knows its accumulation boundaries

    def autocast(self, precision: str) -> AbstractContextManager[None]:
        # The engine holds bf16/fp16 weights; autocast lets fp32 inputs meet them and keeps
        # softmax/norms/losses in fp32.
        return autocast(precision, self.device)

    def backward(self, model: nn.Module, loss: torch.Tensor, accumulation: int) -> None:
        engine: Any = model
        engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        engine.step()  # steps the optimizer only at an accumulation boundary

    def optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float | None
    ) -> None:
        pass  # done by engine.step() in backward; clipping is the config's gradient_clipping

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_files(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, FilePayload]:
        return engine_fragments(model, optimizer, self.rank, self.world_size).files()

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: CommittedCheckpoint
    ) -> None:
        engine: Any = model
        load_engine_state(engine, optimizer, self.rank, ckpt)
        # The loop resumes at a step boundary: the engine's counters follow from the step.
        accumulation = self.spec.trainer.accumulate_grad_batches
        engine.global_steps = ckpt.step
        engine.micro_steps = ckpt.step * accumulation
        engine.global_samples = ckpt.step * engine.train_batch_size()


# -- checkpoints of any ZeRO engine (also the Lightning path's) ------------------------------------


def engine_fragments(
    engine: Any, optimizer: torch.optim.Optimizer, rank: int, world_size: int
) -> ShardWriter:
    """The fp32 master weights and optimizer state a DeepSpeed ZeRO engine holds on ``rank``.

    Every rank records its own fragments; rank 0 also records the buffers (not partitioned)
    and, in the index, the param groups, tied-weight aliases and loss-scaler fields.

    Args:
        engine: A ``DeepSpeedEngine`` with a ZeRO 1, 2 or 3 optimizer.
        optimizer: The torch optimizer that ZeRO optimizer wraps (``engine.optimizer.optimizer``).
        rank: This worker's data-parallel rank.
        world_size: The number of data-parallel ranks.

    Returns:
        The writer, so that a caller can add to its ``meta`` before taking ``files()``.
    """
    zero = _Partitions(engine, rank)
    module = engine.module
    writer = ShardWriter(rank, world_size)
    for fqn, param in module.named_parameters():
        start, numel, master, states = zero.fragment(param)
        writer.add(f"model/{fqn}", master, zero.shape(param), start)
        for key, value in states.items():
            writer.add(f"optim/{key}/{fqn}", value, zero.shape(param), start)
        if rank == 0:
            for key, value in zero.scalar_states(param).items():
                writer.add_whole(f"optim/{key}/{fqn}", value)
    aliases = tied_names(module)
    if rank == 0:
        params = {id(p) for p in module.parameters()}
        for name, value in module.state_dict(keep_vars=True).items():
            if id(value) not in params:  # buffers are not partitioned: one copy
                writer.add_whole(f"model/{name}", value)
        writer.meta["param_groups"] = jsonable(
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        )
        writer.meta["aliases"] = aliases
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        writer.meta["loss_scaler"] = {
            f: getattr(scaler, f) for f in _LOSS_SCALER_FIELDS if hasattr(scaler, f)
        }
    return writer


def load_engine_state(
    engine: Any, optimizer: torch.optim.Optimizer, rank: int, ckpt: CommittedCheckpoint
) -> dict[str, Any]:
    """Load the ranges ``rank`` owns under the engine's layout from any forge checkpoint.

    Sets the fp32 master weights, the working weights, the optimizer state (when the
    checkpoint has some), the param groups' hyper-parameters, buffers and the loss scaler.
    :class:`StateReader` reshards, so the checkpoint may come from any strategy, ZeRO stage and
    world size. The engine's step counters are left to the caller.

    Args:
        engine: A ``DeepSpeedEngine`` with a ZeRO 1, 2 or 3 optimizer.
        optimizer: The torch optimizer that ZeRO optimizer wraps (``engine.optimizer.optimizer``).
        rank: This worker's data-parallel rank.
        ckpt: The checkpoint.

    Returns:
        The checkpoint's metadata (rank 0's index header: param groups, aliases...).
    """
    module = engine.module
    names = [name for name, _ in module.named_parameters()]
    reader = StateReader(ckpt, names, tied_names(module))
    zero = _Partitions(engine, rank)
    with_optim = bool(reader.keys("optim/"))
    if with_optim:
        zero.init_optimizer_state()
    with torch.no_grad():
        for fqn, param in module.named_parameters():
            key = f"model/{fqn}"
            if key not in reader:
                raise CheckpointError(f"{ckpt.uri} has no {key!r}: another model?")
            if tuple(reader.shape(key)) != tuple(zero.shape(param)):
                raise CheckpointError(
                    f"{ckpt.uri}: {key} has shape {list(reader.shape(key))} in the "
                    f"checkpoint but {list(zero.shape(param))} here (another recipe.params?)."
                )
            optim_keys = reader.optim_keys(fqn) if with_optim else []
            zero.load(param, reader, key, {k: f"optim/{k}/{fqn}" for k in optim_keys})
        params = {id(p) for p in module.parameters()}
        for name, value in module.state_dict(keep_vars=True).items():
            if id(value) not in params and f"model/{name}" in reader:
                value.copy_(reader.full(f"model/{name}").reshape(value.shape))
    if with_optim:
        reader.apply_param_groups(optimizer.param_groups)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for field, value in reader.meta.get("loss_scaler", {}).items():
        if hasattr(scaler, field):
            setattr(scaler, field, value)
    return reader.meta


class _Partitions:
    """Where this rank's share of each parameter lives inside a ZeRO optimizer.

    ZeRO-1/2 cut the flattened parameter groups into one contiguous range per rank, so a
    parameter may be split across two ranks (``param._hp_mapping`` says which piece is here).
    ZeRO-3 gives every parameter its own padded partition, ``ceil(numel / world)`` per rank.
    Frozen parameters (``requires_grad=False``) are in no ZeRO group: they have no fp32 master
    or optimizer state, only their working weights (whole under ZeRO-1/2, partitioned under
    ZeRO-3), which are saved and loaded instead.
    """

    def __init__(self, engine: Any, rank: int) -> None:
        self.engine = engine
        self.rank = rank
        self.zo = engine.optimizer
        self.torch_opt: torch.optim.Optimizer = self.zo.optimizer
        self.stage3 = hasattr(self.zo, "fp32_partitioned_groups_flat")
        if self.stage3:
            self.flats = list(self.zo.fp32_partitioned_groups_flat)
            groups = self.zo.fp16_groups
            self.group_of_flat = [self.zo.sub_group_to_group_id[i] for i in range(len(groups))]
        else:
            self.flats = list(
                getattr(self.zo, "single_partition_of_fp32_groups", None)
                or self.zo.fp32_groups_flat_partition  # BF16_Optimizer
            )
            groups = getattr(self.zo, "bit16_groups", None) or self.zo.bf16_groups
            self.group_of_flat = list(range(len(groups)))
        self.flat_of = {id(p): i for i, group in enumerate(groups) for p in group}

    def shape(self, param: Any) -> tuple[int, ...]:
        return tuple(param.ds_shape) if self.stage3 else tuple(param.shape)

    def _range3(self, param: Any) -> tuple[int, int, int]:
        """ZeRO-3: (flat start in the parameter, valid elements here, partition size)."""
        size = param.ds_tensor.ds_numel
        start = self.rank * size
        return start, max(0, min(size, param.ds_numel - start)), size

    def frozen(self, param: Any) -> bool:
        return id(param) not in self.flat_of

    def _flat_state(self, param: Any) -> dict[str, Any]:
        return self.torch_opt.state.get(self.flats[self.flat_of[id(param)]], {})

    def fragment(self, param: Any) -> tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]:
        """(start, numel, fp32 master fragment, {state: fragment}) held by this rank."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if self.frozen(param):
            return self._frozen_fragment(param)
        flat = self.flats[self.flat_of[id(param)]]
        keys = [k for k, v in self._flat_state(param).items() if _is_flat(v, flat)]
        if self.stage3:
            start, valid, _ = self._range3(param)
            master = safe_get_local_fp32_param(param)[:valid]
            states = {k: safe_get_local_optimizer_state(param, k)[:valid] for k in keys}
            return start, valid, master, states
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no piece of this parameter on this rank
            return 0, 0, torch.empty(0), {}
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        state = self._flat_state(param)
        states = {k: state[k].narrow(0, hp.start, hp.numel) for k in keys}
        return lp.start, lp.numel, mapping.hp_fragment, states

    def _frozen_fragment(self, param: Any) -> tuple[int, int, torch.Tensor, dict[str, Any]]:
        if self.stage3:
            start, valid, _ = self._range3(param)
            return start, valid, param.ds_tensor.data[:valid].float(), {}
        if self.rank != 0:  # every rank holds the whole tensor: rank 0 writes the one copy
            return 0, 0, torch.empty(0), {}
        return 0, param.numel(), param.data.float(), {}

    def scalar_states(self, param: Any) -> dict[str, torch.Tensor]:
        """Non-partitioned optimizer state (Adam's ``step``) for ``param``."""
        if self.frozen(param):
            return {}
        flat = self.flats[self.flat_of[id(param)]]
        out = {}
        for key, value in self._flat_state(param).items():
            if not _is_flat(value, flat):
                out[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        return out

    def init_optimizer_state(self) -> None:
        """Create the optimizer's state the way it would itself: one step over zero gradients
        at lr 0 (weights unchanged; torch.distributed.checkpoint does the same)."""
        groups = self.torch_opt.param_groups
        saved = [(g["params"], g["lr"]) for g in groups]
        try:
            for i, flat in enumerate(self.flats):
                if flat in self.torch_opt.state:
                    continue
                for j, group in enumerate(groups):
                    group["params"] = [flat] if j == self.group_of_flat[i] else []
                    group["lr"] = 0.0
                grad = flat.grad
                flat.grad = torch.zeros_like(flat)
                self.torch_opt.step()
                flat.grad = grad
        finally:
            for group, (params, lr) in zip(groups, saved, strict=True):
                group["params"], group["lr"] = params, lr

    def load(self, param: Any, reader: StateReader, key: str, optim: dict[str, str]) -> None:
        """Set this rank's master weights, optimizer state and working weights of ``param``."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        if self.frozen(param):
            self._load_frozen(param, reader, key)
            return
        state = self._flat_state(param)
        for name, value in state.items():  # scalars (step): one value for the whole group
            if not _is_flat(value, self.flats[self.flat_of[id(param)]]) and name in optim:
                loaded = reader.full(optim[name])
                state[name] = (
                    loaded.to(value.dtype).reshape(value.shape)
                    if isinstance(value, torch.Tensor)
                    else type(value)(loaded.item())
                )
        flat = self.flats[self.flat_of[id(param)]]
        flat_keys = [k for k in optim if _is_flat(state.get(k), flat)]
        if self.stage3:
            start, valid, size = self._range3(param)

            def padded(k: str) -> torch.Tensor:
                out = torch.zeros(size, dtype=torch.float32)
                out[:valid] = reader.read(k, start, valid)
                return out

            master = padded(key)
            safe_set_local_fp32_param(param, master.to(param.ds_tensor.device))
            for k in flat_keys:
                safe_set_local_optimizer_state(param, padded(optim[k]).to(state[k].device), k)
            param.ds_tensor.data.copy_(master.to(param.ds_tensor.dtype))
            if param.data.numel() == param.ds_numel:  # a persistent (never partitioned) param
                param.data.copy_(reader.full(key).reshape(param.data.shape))
            return
        full = reader.read(key)
        param.data.copy_(full.reshape(param.shape))  # ZeRO-1/2: every rank holds whole weights
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        mapping.hp_fragment.data.copy_(full[lp.start : lp.start + lp.numel])
        for k in flat_keys:
            state[k].narrow(0, hp.start, hp.numel).copy_(reader.read(optim[k], lp.start, lp.numel))

    def _load_frozen(self, param: Any, reader: StateReader, key: str) -> None:
        if not self.stage3:
            param.data.copy_(reader.full(key).reshape(param.shape))
            return
        start, valid, _ = self._range3(param)
        param.ds_tensor.data[:valid].copy_(reader.read(key, start, valid))
        if param.data.numel() == param.ds_numel:  # a persistent (never partitioned) param
            param.data.copy_(reader.full(key).reshape(param.data.shape))


def _is_flat(value: Any, flat: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == flat.shape
