"""ZeRO-3 models that never exist whole on one rank: partitioned construction and partitioned loading.

    model = build_partitioned(lambda: build_model(cfg.model, vocab_size=n), train_cfg,
                              micro_batch_size=cfg.data.batch_size)      # the plain build unless ZeRO-3
    load_state_partitioned(model, iter_safetensors(files), where=str(directory))  # optional: pretrained weights
    engine = Engine(model, train_cfg, dist, micro_batch_size=...)

Built plainly, a 0.67B-parameter model is 2.7 GB of fp32 on every rank before DeepSpeed partitions
it. `deepspeed.zero.Init` partitions each module's parameters as soon as that module's `__init__`
returns, so a rank holds its 1/N share plus the module being built.

**Initialization.** Our modules initialize their children's weights in their own `__init__`
(`Backbone.init_weights`, `init_encoder_weights`...: `normal_`, `fill_`, `copy_` under no_grad),
after zero.Init has already partitioned those children: the writes would land in empty tensors
(and `copy_` of the audio positions fails). `build_partitioned` therefore also runs a
TorchFunctionMode (`_GatherOnTouch`, torch's public extension point) that gathers a partitioned
parameter when a torch function outside DeepSpeed touches it, and partitions it again (rank 0's
values) when a function touches another parameter or the build ends: one parameter whole at a
time. Every rank runs the same construction from the same seed, so the random numbers are drawn
in the same order as in one process.

The build runs in fp32 whatever `train.precision`: zero.Init would otherwise cast every float
tensor a torch constructor makes to bf16, temporaries included (the audio encoder's sinusoid
positions would round to even numbers above 256 and to multiples of 4 above 512, the table
garbage), and initializers would draw in bf16. Under bf16 each rank's fp32 partitions are then cast to bf16, as DeepSpeed casts a
model built whole. So the gathered weights equal those of a one-process build with the same
seed bit for bit, in fp32 and in bf16 (tests/test_zero_init.py). The fp32 partitions cost a rank
4/N bytes per parameter for the length of the build.

**Loading.** `load_state_partitioned` writes (name, tensor) pairs, read one tensor at a time
(`iter_safetensors`), into such a model: each parameter gathered alone with
`GatheredParameters(modifier_rank=0)`, rank 0's tensor copied in, partitioned again; strict like
`hf_adapters.load_state_strict`. Call it before `Engine` wraps the model (DeepSpeed copies the
partitions into its fp32 master weights then).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.overrides import TorchFunctionMode

from omni_train.errors import one_line
from omni_train.train.safe_load import CheckpointFileError


def build_partitioned(build: Callable[[], nn.Module], train_cfg, *, micro_batch_size: int, enabled: bool = True,
                      random_init: bool = True) -> nn.Module:
    """`build()`, born partitioned under `train.engine=deepspeed train.zero_stage=3` (module docstring).

    Just `build()` for other engines and stages, or with `enabled=False` (a model that reads whole
    weights while it is built). Collective under ZeRO-3 (DeepSpeed's process group is up): every rank
    builds the same model from the same seed. `build` must not gather parameters itself.
    `random_init=False` for weights that `load_state_partitioned` writes next: what the modules'
    initializers write into already partitioned parameters is skipped rather than gathered (each
    keeps its layer's own default initialization until loaded), which saves one whole copy of the
    largest parameter per rank (the tied embedding) and the time.
    """
    if not (enabled and train_cfg.engine == "deepspeed" and train_cfg.zero_stage == 3):
        return build()
    import deepspeed

    from omni_train.train.engine import deepspeed_config

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")  # nn.init, random_init=False
        # mem_efficient_linear=False: zero.Init would otherwise replace torch.nn.functional.linear process-wide
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train_cfg, micro_batch_size), dtype=torch.float32,
                                 mem_efficient_linear=False):
            with _GatherOnTouch(random_init):
                model = build()
    if train_cfg.precision == "bf16":
        _cast_partitions(model, torch.bfloat16)
    return model


def _cast_partitions(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast each ZeRO-3 partition (and the empty placeholder that gives the parameter its dtype) to `dtype`."""
    for param in model.parameters():
        if param.ds_tensor.dtype != dtype:
            partition = param.ds_tensor.data.to(dtype)
            param.ds_tensor.data = partition.pin_memory() if param.ds_tensor.is_pinned() else partition
            param.data = torch.empty(0, dtype=dtype, device=param.device)


def _is_partitioned(value) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return isinstance(value, nn.Parameter) and getattr(value, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


def _called_by_deepspeed() -> bool:
    """Whether the torch function being handled was called by DeepSpeed (partitioning a parameter reads it
    after marking it partitioned): the nearest caller outside torch's own modules is in deepspeed."""
    frame = sys._getframe(2)  # above _GatherOnTouch.__torch_function__
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "torch" and not module.startswith("torch."):
            return module.startswith("deepspeed")
        frame = frame.f_back
    return False


def _parameters_in(value, found: list) -> list:
    if isinstance(value, nn.Parameter):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _parameters_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _parameters_in(item, found)
    return found


class _GatherOnTouch(TorchFunctionMode):
    """Gather a ZeRO-3 partitioned parameter before a torch function touches it; partition it again (rank 0's
    values, broadcast) when a function touches another parameter or the mode exits. See the module docstring.

    A view taken of a gathered parameter does not follow it into its partition: initializers write
    through the parameter itself (`p.normal_()`, `p.copy_(x)`, `p.data.fill_()`, `p[:n] = x`), which is fine.
    """

    def __init__(self, initialize: bool = True):
        super().__init__()
        self.initialize = initialize  # False: skip writes into partitioned parameters instead (random_init=False)
        self.gathered: dict[int, tuple[nn.Parameter, contextlib.AbstractContextManager]] = {}

    def _release(self, keep: set[int] = frozenset()) -> None:
        for key in [k for k in self.gathered if k not in keep]:
            _, gathered = self.gathered.pop(key)
            gathered.__exit__(None, None, None)  # broadcast from rank 0, keep this rank's slice

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch leaves this mode while its own handler runs, so DeepSpeed's gathers below do not come back here
        touched = [p for p in _parameters_in((args, kwargs), []) if id(p) in self.gathered or _is_partitioned(p)]
        if touched and not _called_by_deepspeed():
            if not self.initialize:  # weights to be loaded: writes into them are skipped, reads see the empty partition
                name = getattr(func, "__name__", "")
                writes = name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))  # in place
                if writes and args and any(args[0] is p for p in touched):
                    return None if name == "__setitem__" else args[0]
                return func(*args, **kwargs)
            import deepspeed

            self._release(keep={id(p) for p in touched})
            for param in touched:
                if id(param) not in self.gathered:
                    gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0)
                    gathered.__enter__()
                    self.gathered[id(param)] = (param, gathered)
        return func(*args, **kwargs)

    def __exit__(self, exc_type, exc_value, traceback):
        super().__exit__(exc_type, exc_value, traceback)  # leave the mode first: releasing runs torch functions
        if exc_type is None:
            self._release()


def iter_safetensors(paths: Iterable[str | Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each safetensors file in turn, one tensor in memory at a time (on the CPU, as stored)."""
    from safetensors import safe_open

    for path in paths:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError ...: the file is what is wrong
            raise CheckpointFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_state_partitioned(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, where: str) -> None:
    """Write a full state dict, given as (name, tensor) pairs, into `model`, one parameter at a time.

    A ZeRO-3 partitioned parameter is gathered alone, rank 0's tensor written into it, and partitioned
    again, so no rank ever holds more than one whole parameter and one tensor of `tensors`; other
    parameters and buffers are copied into directly. Values are cast to each parameter's dtype.
    Collective under ZeRO-3: every rank calls it with the same names and shapes in the same order.
    Strict: a missing, unexpected, repeated or mis-shaped name is refused with one ValueError naming
    them all and `where` (after the whole stream was read; the model is then partly written: build it
    again). Call it before `Engine` wraps the model.
    """
    expected = model.state_dict(keep_vars=True)                             # name -> Parameter or buffer
    shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in expected.items()}  # ZeRO-3: ds_shape
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    seen: set[str] = set()
    unexpected, repeated, mismatched = [], [], []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
        elif name in seen:
            repeated.append(name)
        elif tuple(tensor.shape) != shapes[name]:
            mismatched.append(f"{name} {tuple(tensor.shape)} vs {shapes[name]}")
        seen.add(name)
        if unexpected or repeated or mismatched:
            continue  # refused at the end; every rank stops writing at the same name, so no collective is left waiting
        target = expected[name]
        if hasattr(target, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        target.copy_(tensor)
        else:
            with torch.no_grad():
                target.copy_(tensor)
    missing = sorted(expected.keys() - seen)
    problems = [f"{label} ({len(names)}): {', '.join(names)}" for label, names in
                (("missing", missing), ("unexpected", sorted(unexpected)), ("repeated", sorted(set(repeated))),
                 ("shape checkpoint vs model", mismatched)) if names]
    if problems:
        raise ValueError(f"{where}: checkpoint does not match the model: {'; '.join(problems)}")
