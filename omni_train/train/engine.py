"""The one place where the single-device model is wrapped for training: single process, DDP or DeepSpeed ZeRO.

    dist = init_distributed(train_cfg.engine)            # torchrun env -> process group (gloo on CPU, NCCL on GPU)
    engine = Engine(model, train_cfg, dist, micro_batch_size=...)
    out = engine.train_step(micro_batches)               # forward + backward per micro-batch, then one optimizer step
    out = engine.train_step(micro_batches, grad_norms=True)  # + per-module / per-modality gradient norms (diagnostics.py)
    engine.save(dir) / engine.load(dir)
    shutdown(engine, dist)

Under ZeRO-3 the model is also born partitioned (`zero3.build_partitioned`, around the build in
`loop.train`), and pretrained weights are written into it one parameter at a time
(`zero3.load_state_partitioned`). `train.loss_chunk_tokens` is handed to the model here.

Model code never sees any of this. Gradient accumulation, clipping, bf16 and the optimizer step
differ per engine and live here; the loop calls the same three methods whatever the engine.

With `train.lora`, checkpoints hold only the parameters that train (the adapters): the frozen base
is written once per run (`runs.build_run_model`, `runs/NAME/base/`) rather than copied into every
checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from safetensors.torch import save_file
from torch import nn

from omni_train.train.optim import build_scheduler, check_stage_modules, module_groups
from omni_train.train.safe_load import load_state, only_plain_state, read_safetensors

ENGINES = ("single", "ddp", "deepspeed")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(engine: str) -> Dist:
    """Read torchrun's environment and start the process group the engine needs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Subnormal floats cost x86 cores 10-100x per operation. Once a softmax over a vocabulary is confident,
        # its gradient is full of them: the demo's CTC head backward (1,000 frames x 1,001 outputs) went from
        # ~5 to ~130 ms per matmul and a late step from 0.5 to 0.28 s with them flushed (docs/demo.md).
        torch.set_flush_denormal(True)
    if engine == "single":
        if world_size > 1:
            raise ValueError(f"train.engine=single runs one process, but torchrun started {world_size}; use ddp or deepspeed")
        return Dist(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's store outlives a restart (--max-restarts) and keeps the first attempt's process-group
                # keys: a restarted rank read its peer's dead address there and waited for it (measured). Each
                # attempt gets keys of its own.
                store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                            is_master=False)
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                torch_dist.init_process_group(backend=backend, store=torch_dist.PrefixStore(f"attempt_{attempt}", store),
                                              rank=rank, world_size=world_size)
            else:
                torch_dist.init_process_group(backend=backend)
        elif engine != "deepspeed":
            return Dist(0, 1, 0, device, None)
        if engine == "deepspeed":  # adopts the process group made above (or, alone, makes its own)
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return Dist(rank, world_size, local_rank, device, backend)


def barrier(dist: Dist) -> None:
    if dist.backend is not None and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce(values: list[float], dist: Dist, op: str = "sum") -> list[float]:
    if dist.backend is None or dist.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device if dist.backend == "nccl" else "cpu")
    torch_dist.all_reduce(tensor, op={"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN,
                                      "max": torch_dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def deepspeed_config(cfg, micro_batch_size: int) -> dict:
    """configs/deepspeed/zero{N}.json (or train.deepspeed_config) completed from the recipe."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else REPO_ROOT / "configs" / "deepspeed" / f"zero{cfg.zero_stage}.json"
    if cfg.zero_stage == 0 and not cfg.deepspeed_config:
        ds = {"zero_optimization": {"stage": 0}}
    else:
        if not path.is_file():
            raise ValueError(f"train.deepspeed_config: {path} does not exist")
        ds = json.loads(path.read_text())
    ds["zero_optimization"]["stage"] = cfg.zero_stage
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_allow_untested_optimizer": True,  # our torch AdamW avoids the fused_adam JIT build on CPU
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
    })
    return ds


class Engine:
    """train_step / eval_loss / save / load over one of the three wrappers."""

    def __init__(self, model: nn.Module, cfg, dist: Dist, micro_batch_size: int):
        self.cfg, self.dist = cfg, dist
        self.model = model
        model.loss_chunk_tokens = cfg.loss_chunk_tokens  # OmniModel.next_token_loss: memory only, same loss
        check_stage_modules(model, cfg.stages)
        groups = module_groups(model, cfg.modules, cfg.weight_decay)
        # LoRA: what checkpoints hold (None: every parameter)
        self.saved_parameters = ({name for name, p in model.named_parameters() if p.requires_grad}
                                 if cfg.lora is not None else None)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                      foreach=dist.device.type == "cuda")
        make_scheduler = lambda opt: build_scheduler(opt, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,  # noqa: E731
                                                     min_lr_ratio=cfg.min_lr_ratio, decay_steps=cfg.decay_steps,
                                                     stages=cfg.stages)
        self.autocast = cfg.precision == "bf16" and cfg.engine != "deepspeed"
        if cfg.engine == "deepspeed":
            import deepspeed

            # DeepSpeed calls torch's renamed collectives on every step; one warning per call floods the log
            warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
            self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=deepspeed_config(cfg, micro_batch_size))
            self.module = self.wrapped.module
        else:
            model.to(dist.device)
            self.optimizer, self.scheduler = optimizer, make_scheduler(optimizer)
            if cfg.engine == "ddp" and dist.backend is not None:
                from torch.nn.parallel import DistributedDataParallel

                # every encoder runs on every step (omni.py), so no unused parameters are expected
                self.wrapped = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                                                       gradient_as_bucket_view=True)  # no second copy of the gradients
            else:
                self.wrapped = model
            self.module = model

    def _forward(self, batch: dict[str, Any]):
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.wrapped(move_batch(batch, self.dist.device))

    def train_step(self, micro_batches: list[dict[str, Any]], *, grad_norms: bool = False,
                   judge: Callable[[list[float]], Any] | None = None, loss_factor: float = 1.0) -> dict[str, Any]:
        """One optimizer step over len(micro_batches) == train.grad_accum micro-batches.

        With `grad_norms` (every rank passes the same), the result also holds `module_grad_norms` and
        `feature_grad_norms` (diagnostics.py); with train.diagnostics.loss_share, `task_losses`
        ({task: [summed token loss, targets]} of this rank's micro-batches).

        `judge` (train.nan_guard, every rank passes one: faults.BadStepGuard.judge) sees this rank's micro-batch
        losses before the last backward and returns the ranks' common verdict. A bad step sends a non-finite loss
        backward, and every engine then skips the update on every rank the same way it skips a non-finite gradient:
        single / DDP here (no optimizer or scheduler step), DeepSpeed ZeRO 1-3 in its own overflow check (which
        counts `skipped_steps`), DeepSpeed without ZeRO by leaving no gradient for the optimizer. The result's
        `skipped` then holds the reason (None: the step updated). `loss_factor` scales this rank's last loss (an
        injected fault, faults.py).
        """
        from omni_train.train.diagnostics import FeatureGradients, backbone_documents, module_grad_norms, task_losses

        self.wrapped.train()
        losses, aux, tasks = [], {}, {}
        features = FeatureGradients(self.module) if grad_norms else None
        loss_share = self.cfg.diagnostics.loss_share
        verdict = None
        zero = self.cfg.engine == "deepspeed" and self.cfg.zero_stage > 0
        skipped_before = self.wrapped.skipped_steps if zero else 0

        def judged(loss: torch.Tensor, last: bool) -> torch.Tensor:
            nonlocal verdict
            if loss_factor != 1.0 and last:
                loss = loss * loss_factor
            losses.append(loss.detach().float().item())
            if judge is not None and last:
                verdict = judge(losses)  # None: no guard
                if verdict is not None and verdict.bad:  # the engines' own skip path: a non-finite gradient
                    loss = loss * float("nan")
            return loss

        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            recording = features.recording(batch) if features is not None else contextlib.nullcontext()
            documents = backbone_documents(self.module) if loss_share else contextlib.nullcontext([])
            if self.cfg.engine == "deepspeed":
                with recording, documents as seen:
                    out = self._forward(batch)
                    self.wrapped.backward(judged(out.loss, last))
                if grad_norms and last:  # full gradients exist only between the boundary's backward and step
                    module_norms = module_grad_norms(self.module, deepspeed=True)
                if last and verdict is not None and not zero and not _finite_grad_norm(self.module):
                    for p in self.module.parameters():  # DeepSpeed without ZeRO: nothing for the optimizer to apply
                        p.grad = None
                    verdict.reason = verdict.reason or "non-finite gradient norm"
                self.wrapped.step()
            else:
                sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
                with sync, recording, documents as seen:
                    out = self._forward(batch)
                    (judged(out.loss, last) / len(micro_batches)).backward()
            if loss_share:
                for task, (loss_sum, count) in task_losses(out.per_token_loss.detach(), seen[-1] if seen else
                                                           batch["document_ids"], batch).items():
                    entry = tasks.setdefault(task, [0.0, 0.0])
                    entry[0], entry[1] = entry[0] + loss_sum, entry[1] + count
            for name, value in out.aux.items():  # a transfer mechanism's terms (already inside the loss)
                aux[name] = aux.get(name, 0.0) + float(value) / len(micro_batches)
        extra: dict[str, Any] = {"task_losses": tasks} if loss_share else {}
        if grad_norms:
            if self.cfg.engine != "deepspeed":  # before clipping, as grad_norm
                module_norms = module_grad_norms(self.module, deepspeed=False)
            extra.update(module_grad_norms=module_norms, feature_grad_norms=features.norms(self.dist))
        skipped = None
        if self.cfg.engine == "deepspeed":
            grad_norm = self.wrapped.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if zero and self.wrapped.skipped_steps > skipped_before:
                skipped = (verdict.reason if verdict is not None and verdict.bad else None) or "non-finite gradient norm"
            elif verdict is not None and verdict.bad:
                if zero:  # never let a judged step through silently
                    raise RuntimeError(f"DeepSpeed updated the weights after a step judged bad ({verdict.reason})")
                skipped = verdict.reason
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
            if verdict is not None and (verdict.bad or not math.isfinite(grad_norm)):
                skipped = verdict.reason or "non-finite gradient norm"  # the same on every rank: DDP's gradients are
                self.optimizer.zero_grad(set_to_none=True)              # reduced, the verdict is common
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
        return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm, "lr": self.lr(), "aux": aux,
                "skipped": skipped, "bad_ranks": verdict.bad_ranks if verdict is not None else [], **extra}

    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    @torch.no_grad()
    def eval_output(self, batch: dict[str, Any]):
        """The model's `OmniOutput` for one batch in eval mode, through the wrapper (ZeRO-3 gathers here)."""
        self.wrapped.eval()
        return self._forward(batch)

    def eval_loss(self, batch: dict[str, Any]) -> tuple[float, int]:
        """(sum of token losses, number of loss tokens) of one batch."""
        out = self.eval_output(batch)
        return float(out.lm_loss) * int(out.num_loss_tokens), int(out.num_loss_tokens)

    def full_model(self, build) -> nn.Module:
        """A module with all weights present, for probes: the model itself, or under ZeRO-3 a copy
        (`build()` makes a fresh one) filled from the gathered partitions. Collective under ZeRO-3:
        every rank calls it. The model code reads some weights outside their module's forward (tied
        embeddings, position tables), which ZeRO-3 only gathers inside the engine's own forward."""
        if self.cfg.engine != "deepspeed" or self.cfg.zero_stage != 3:
            return self.module
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            state = {k: v.detach().float().clone() for k, v in self.module.state_dict().items()}
        copy = build()
        copy.load_state_dict(state)
        copy.loss_chunk_tokens = self.cfg.loss_chunk_tokens
        return copy.to(self.dist.device)

    # -- checkpoints: `directory` is a fresh per-checkpoint folder that every rank writes into
    def save(self, directory: Path) -> None:
        if self.cfg.engine == "deepspeed":
            self.wrapped.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=self.saved_parameters is not None)
            return
        if self.dist.is_main:
            state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()
                     if self.saved_parameters is None or k in self.saved_parameters}
            save_file(state, str(directory / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        if self.cfg.engine == "deepspeed":
            with only_plain_state(directory):  # DeepSpeed unpickles with weights_only=False otherwise
                path, _ = self.wrapped.load_checkpoint(str(directory), tag="engine", load_optimizer_states=True,
                                                       load_lr_scheduler_states=True,
                                                       load_module_strict=self.saved_parameters is None)
            if path is None:
                raise ValueError(f"{directory}: no DeepSpeed checkpoint (engine/) to resume from")
            return
        if not (directory / "model.safetensors").is_file():
            raise ValueError(f"{directory}: no model.safetensors; was it written by train.engine=deepspeed?")
        state = read_safetensors(directory / "model.safetensors", device=str(self.dist.device))
        if self.saved_parameters is not None and set(state) != self.saved_parameters:
            raise ValueError(f"{directory}: the checkpoint's parameters are not this run's trainable ones "
                             f"({len(state)} saved, {len(self.saved_parameters)} trainable)")
        self.module.load_state_dict(state, strict=self.saved_parameters is None)
        # optimizer and scheduler states are tensors and numbers, never arbitrary objects
        self.optimizer.load_state_dict(load_state(directory / "optimizer.pt", map_location=self.dist.device))
        self.scheduler.load_state_dict(load_state(directory / "scheduler.pt"))


def _finite_grad_norm(module: nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def shutdown(engine: Engine | None, dist: Dist) -> None:
    """The exit sequence that avoids DeepSpeed's occasional abort at interpreter shutdown (ENVIRONMENT.md)."""
    barrier(dist)
    if engine is not None and engine.cfg.engine == "deepspeed":
        engine.wrapped.destroy()
    del engine
    gc.collect()
    barrier(dist)
    if dist.backend is not None and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
