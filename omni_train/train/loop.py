"""The training loop: a visible `while` over steps, with eval, checkpoint and log as `every(...)` lines.

    torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/smoke.yaml train.steps=50
    torchrun --nproc_per_node=2 launch/finetune.py --recipe recipes/meeting-finetune.yaml init.run=runs/demo

`train(cfg)` builds the model (single-device code; base weights and LoRA adapters by
`runs.build_run_model`; under ZeRO-3 born partitioned, `zero3.build_partitioned`), wraps it
once in `engine.Engine`, streams packed batches from `data.pipeline.DataPipeline`, and writes
the run directory: config.yaml, metrics.jsonl (with each rank's peak resident memory,
`max_rss_mb`, the largest over ranks), skipped.jsonl, probes.jsonl, checkpoints/step_XXXXXXXX/.
`train.diagnostics` adds per-module and per-modality gradient norms, loss shares per task, modality
reliance with its collapse alarm (`diagnostics.py`) to the metrics rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omni_train.train.checkpoint import (finalize, read_rank_state, remove_partial, resolve_resume, step_dir,
                                         write_rank_state)
from omni_train.train.diagnostics import CollapseWatch, DiagnosticsConfig, loss_share_metrics, measure_reliance
from omni_train.train.engine import ENGINES, Engine, all_reduce, barrier, init_distributed, shutdown
from omni_train.errors import RunStopped
from omni_train.train.faults import BadStepGuard, FaultInjector, Preemption
from omni_train.train.lora import LoraConfig, apply_lora, parameter_counts
from omni_train.train.metrics import TRACKERS, MetricsLogger, drop_rows_after, max_rss_mb
from omni_train.train.optim import ModuleOptimConfig, StageConfig
from omni_train.train.zero3 import build_partitioned, load_state_partitioned

PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 2000
    engine: str = "deepspeed"           # single | ddp | deepspeed
    zero_stage: int = 2                 # 0-3, with engine=deepspeed
    deepspeed_config: str | None = None  # default: configs/deepspeed/zero{zero_stage}.json
    precision: str = "bf16"             # fp32 | bf16
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio at `steps`
    warmup_steps: int = 100
    decay_steps: int = 0                # > 0: hold lr after warmup, cosine over the last decay_steps (warmup-stable-decay)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200               # 0: no held-out eval
    eval_batches: int = 20              # per rank, at most
    checkpoint_every: int = 200
    keep_checkpoints: int = 3           # 0 keeps all
    resume: str = "auto"                # auto (latest in output_dir) | never | a checkpoint path
    tracker: str = "wandb"              # wandb (offline without WANDB_API_KEY) | none
    progress: bool = True
    modules: dict[str, ModuleOptimConfig] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    lora: LoraConfig | None = None      # LoRA adapters (lora.py); None: every parameter of the unfrozen modules trains
    probes_at_start: bool = False       # run the probes once before the first step (the base model's numbers)
    loss_chunk_tokens: int = 0          # > 0: logits + loss of at most this many target positions at a time (model/loss.py)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)  # grad norms, loss shares, reliance
    # faults.py: a step with a non-finite loss or gradient (or, with spike_guard k > 0, a mean loss above k x the
    # median of the last spike_window good steps) updates nothing on any rank; max_bad_steps in a row stop the run
    nan_guard: bool = True
    max_bad_steps: int = 5
    spike_guard: float = 0.0
    spike_window: int = 100
    deterministic: bool = False         # torch.use_deterministic_algorithms: bitwise-equal reruns and resumes
    log_samples: bool = False           # samples.jsonl: each rank's samples of each step (shard, key, epoch)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "decay_steps", "eval_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.spike_guard and not self.spike_guard > 1:
            raise ValueError(f"train.spike_guard must be 0 (off) or a factor above 1 of the median loss, got {self.spike_guard}")
        if self.spike_guard and not self.nan_guard:
            raise ValueError("train.spike_guard skips steps through train.nan_guard: set train.nan_guard=true")
        if self.spike_window < 2:
            raise ValueError(f"train.spike_window must be >= 2 steps, got {self.spike_window}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"train.loss_chunk_tokens must be >= 0 (0: the whole loss at once), got {self.loss_chunk_tokens}")
        trains_output = self.lora is None or "backbone" in self.lora.full_modules
        if self.loss_chunk_tokens and self.engine == "deepspeed" and self.zero_stage == 3 and trains_output:
            # the chunked loss gathers the partitioned output projection itself, and would hand back its gradient
            # after DeepSpeed partitioned it again; under ZeRO-3 it serves frozen output projections (LoRA)
            raise ValueError("train.loss_chunk_tokens under ZeRO-3 needs a frozen output projection (train.lora without "
                             "backbone in full_modules); set train.loss_chunk_tokens=0 to train it")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0     # real (non-padding) tokens, all ranks
    samples_seen: int = 0
    guard: dict = field(default_factory=dict)  # faults.BadStepGuard's state


def write_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class Evaluator:
    """Held-out loss on `data.eval`: the same batches every time, the same number on every rank."""

    def __init__(self, cfg, dist, tokenizer):
        self.cfg, self.dist, self.tokenizer = cfg, dist, tokenizer
        self.batches: list[dict] | None = None

    def load(self) -> list[dict]:
        """The eval batches of this rank, read once (modality reliance measures on them too)."""
        from omni_train.data.pipeline import DataPipeline

        if self.batches is None:
            pipeline = DataPipeline(dataclasses.replace(self.cfg.data, num_workers=0), self.cfg.data.eval,
                                    tokenizer=self.tokenizer, rank=self.dist.rank, world_size=self.dist.world_size,
                                    seed=self.cfg.seed, epochs=1)
            self.batches = []
            for batch in pipeline:
                self.batches.append(batch)
                if len(self.batches) == self.cfg.train.eval_batches:
                    break
            # ZeRO-3 gathers parameters in every forward: all ranks must run the same number
            (num,) = all_reduce([len(self.batches)], self.dist, op="min")
            self.batches = self.batches[: int(num)]
        return self.batches

    def __call__(self, engine: Engine) -> float | None:
        if not self.load():
            return None
        total = count = 0.0
        for batch in self.batches:
            loss_sum, n = engine.eval_loss(batch)
            total, count = total + loss_sum, count + n
        total, count = all_reduce([total, count], self.dist)
        return total / max(count, 1)


def save_checkpoint(engine: Engine, state: TrainState, data, cfg, dist, config_yaml: str,
                    injector: FaultInjector | None = None) -> Path:
    root = Path(cfg.output_dir) / "checkpoints"
    final = step_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    engine.save(tmp)
    write_rank_state(tmp, dist.rank, data.state_dict())
    if injector is not None:
        injector.at("save", state.step)  # a fault due while the checkpoint is half written
    if dist.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({**dataclasses.asdict(state), "world_size": dist.world_size}))
        (tmp / "config.yaml").write_text(config_yaml)
        if cfg.train.lora is not None:  # the checkpoint holds the adapters only: say what they apply to
            (tmp / "adapter.json").write_text(json.dumps(adapter_summary(engine, cfg), indent=1))
    barrier(dist)
    if dist.is_main:
        finalize(tmp, final, cfg.train.keep_checkpoints)
    barrier(dist)
    return final


def adapter_summary(engine: Engine, cfg) -> dict:
    """What a LoRA checkpoint's adapters apply to: the run's base/ (made from the init run and step or the
    pretrained components named here), or the Omni checkpoint of model.pretrained, and the adapted layers."""
    from peft.tuners.lora import LoraLayer

    from omni_train.train.runs import BASE_DIR

    pretrained = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name.startswith("pretrained")}
    # a whole Omni thinker is its own base (never copied to base/): its directory
    base = cfg.model.pretrained if cfg.model.pretrained and cfg.init.run is None else f"../../{BASE_DIR}"
    return {"lora": dataclasses.asdict(cfg.train.lora), "base": base, "init": dataclasses.asdict(cfg.init),
            "pretrained": pretrained,
            "adapted_layers": [name for name, m in engine.module.named_modules() if isinstance(m, LoraLayer)],
            "saved_parameters": sorted(engine.saved_parameters or [])}


def describe_parameters(model: torch.nn.Module) -> str:
    counts = parameter_counts(model)
    line = f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable"
    if counts["adapter"]:
        line += f", {counts['adapter']:,} in LoRA adapters"
    return line


def check_run(cfg) -> tuple[Any, Path | None, dict | None]:
    """What every rank checks before any work and before anything in the run directory changes: the
    tokenizer, every train and eval shard pattern, each probe's shards and the sandbox a probe that runs
    generated code needs, the resume target (and that this engine and world size can read it). Returns
    (tokenizer, checkpoint folder or None, its trainer state)."""
    from omni_train.data.pipeline import expand_shards
    from omni_train.data.text import Tokenizer

    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir: {output_dir} exists and is not a directory")
    if not cfg.data.train:
        raise ValueError("data.train names no shards")
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    reliance = cfg.train.diagnostics.reliance_every
    if reliance and not cfg.data.eval:
        raise ValueError("train.diagnostics.reliance_every measures on data.eval batches, but data.eval names no shards")
    evaluated = cfg.data.eval if cfg.train.eval_every or reliance else []  # otherwise data.eval is never read
    for key, sources in (("data.train", cfg.data.train), ("data.eval", evaluated)):
        for i, source in enumerate(sources):
            try:
                expand_shards(source.shards, allow_remote=cfg.data.allow_remote)
            except (ValueError, OSError) as e:
                raise ValueError(f"{key}[{i}].shards: {e}") from None
    from omni_train.probes.runner import check_probe

    for i, probe in enumerate(cfg.probes):
        try:
            check_probe(probe)
        except (ValueError, OSError) as e:
            raise ValueError(f"probes[{i}] ({probe.name}): {e}") from None
    checkpoint = resolve_resume(cfg.train.resume, output_dir / "checkpoints")
    if checkpoint is None:
        return tokenizer, None, None
    state_file = checkpoint / "trainer_state.json"
    try:
        saved = json.loads(state_file.read_text())
        saved_world_size = int(saved["world_size"])
        for name in ("step", "tokens_seen", "samples_seen"):
            int(saved[name])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"train.resume: {state_file} is not a trainer state ({type(e).__name__}: {e})") from None
    written_by_deepspeed = (checkpoint / "engine").is_dir()
    if written_by_deepspeed != (cfg.train.engine == "deepspeed"):
        raise ValueError(f"train.resume: {checkpoint} was written by "
                         f"{'train.engine=deepspeed' if written_by_deepspeed else 'train.engine=single or ddp'}; "
                         f"this run has train.engine={cfg.train.engine}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if saved_world_size != world_size and written_by_deepspeed:
        # single / ddp checkpoints hold the whole model and optimizer; ZeRO's are partitioned by rank
        raise ValueError(f"train.resume: {checkpoint} was written by {saved_world_size} ranks under DeepSpeed, whose "
                         f"optimizer state is partitioned per rank; this run has {world_size}: resume it with "
                         f"{saved_world_size} (train.engine=ddp checkpoints resume at any world size)")
    return tokenizer, checkpoint, saved


def train(cfg) -> TrainState:
    """Run (or resume) the recipe `cfg` in this process; torchrun starts one per rank."""
    from omni_train.config import to_yaml
    from omni_train.data.pipeline import DataPipeline, state_problem
    from omni_train.errors import preflight

    tcfg = cfg.train
    with preflight():  # the same on every rank, before any work: reported once
        tokenizer, checkpoint, saved = check_run(cfg)
    dist = init_distributed(tcfg.engine)
    output_dir = Path(cfg.output_dir)
    config_yaml = to_yaml(cfg)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(output_dir / "config.yaml", config_yaml)
        for partial in remove_partial(output_dir / "checkpoints"):  # a save that a crash cut short
            print(f"removed {partial}: a checkpoint whose writing was interrupted", flush=True)
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    from omni_train.probes.runner import format_table, probes_due, run_probes
    from omni_train.train.runs import BASE_DIR, build_run_model
    from omni_train.model.audio_encoder import AudioEncoder
    from omni_train.model.hf_adapters import weights_label
    from omni_train.model.omni import build_model
    from omni_train.model.qwen2_5_omni import iter_thinker_state

    # base weights, then LoRA adapters (a LoRA run keeps its frozen base in base/): before the engine wraps the model
    base_dir = output_dir / BASE_DIR if tcfg.lora is not None else None
    # ZeRO-3: born partitioned, no whole fp32 copy per rank; a model that reads whole weights while it is built
    # (pretrained components, init.run, a LoRA base) is built whole and partitioned by the engine, as before
    reads_weights = cfg.init.run is not None or tcfg.lora is not None or any(
        getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name.startswith("pretrained"))
    if cfg.model.pretrained and cfg.init.run is None:
        # a whole Omni thinker: under ZeRO-3 born partitioned and loaded tensor by tensor. A LoRA run's frozen base is
        # the pretrained directory itself (resume, probe and export read it again), so no base/ copy is written.
        model = build_partitioned(lambda: build_model(cfg.model, vocab_size=tokenizer.vocab_size, load_weights=False),
                                  tcfg, micro_batch_size=cfg.data.batch_size, random_init=False)
        load_state_partitioned(model, iter_thinker_state(cfg.model.pretrained, model.cfg.backbone),
                               where=weights_label(cfg.model.pretrained))
        if tcfg.lora is not None:
            torch.manual_seed(cfg.seed)  # the same adapter initialization on every rank (runs.build_run_model)
            apply_lora(model, tcfg.lora)
    else:
        model = build_partitioned(lambda: build_run_model(cfg, tokenizer, base_dir=base_dir,
                                                          reuse_base=checkpoint is not None, write_base=dist.is_main),
                                  tcfg, micro_batch_size=cfg.data.batch_size, enabled=not reads_weights)
    engine = Engine(model, tcfg, dist, micro_batch_size=cfg.data.batch_size)
    data = DataPipeline(cfg.data, tokenizer=tokenizer, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                        skip_log=output_dir / "skipped.jsonl", augment=True)
    state = TrainState()
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # per-rank randomness from here on (dropout, sampling)

    guard = BadStepGuard(tcfg)
    if checkpoint is not None:
        engine.load(checkpoint)
        state = TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"], samples_seen=saved["samples_seen"],
                           guard=saved.get("guard") or {})
        guard.load_state_dict(state.guard)
        data_states = read_rank_state(checkpoint, dist.rank, saved["world_size"])  # names the file it cannot read
        for saved_rank, data_state in enumerate(data_states):
            if (problem := state_problem(data_state)) is not None:
                raise ValueError(f"{checkpoint / f'data_rank{saved_rank}.json'}: not a data pipeline state ({problem})")
        try:  # at another world size, every rank reads all the saved ranks' states (pipeline.py: Carry)
            layout_change = data.load_state_dicts(data_states)
        except ValueError as e:
            raise ValueError(f"{checkpoint}: {e}") from None

    logger = MetricsLogger(output_dir, enabled=dist.is_main, total_steps=tcfg.steps, start_step=state.step,
                           tracker=tcfg.tracker, run_name=cfg.name, config=dataclasses.asdict(cfg), progress=tcfg.progress)
    if checkpoint is not None:
        logger.write(f"resumed from {checkpoint} at step {state.step}")
        if layout_change:
            logger.write(layout_change)
        if dist.is_main:  # the steps after the checkpoint run again: their rows from an attempt that crashed go
            for name in ("metrics.jsonl", "probes.jsonl", "probe_examples.jsonl", "bad_steps.jsonl", "samples.jsonl"):
                if dropped := drop_rows_after(output_dir / name, state.step):
                    logger.write(f"{name}: dropped {dropped} rows of steps after {state.step}, which run again")
    logger.write(describe_parameters(engine.module))
    diagnostics = tcfg.diagnostics
    evaluator = Evaluator(cfg, dist, tokenizer) if cfg.data.eval and (tcfg.eval_every or diagnostics.reliance_every) else None
    collapse = CollapseWatch(diagnostics)
    task_losses: dict[str, list[float]] = {}  # loss_share: this rank's sums since the last logged row
    replica = lambda: build_run_model(cfg, tokenizer, base_dir=base_dir, load_init=False)  # noqa: E731 - ZeRO-3 probe copies
    if tcfg.probes_at_start and state.step == 0 and cfg.probes:
        probe_rows = run_probes(engine.full_model(replica), cfg.probes, data_cfg=cfg.data, tokenizer=tokenizer, dist=dist,
                                step=0, output_dir=output_dir)
        if probe_rows:
            logger.write(format_table(probe_rows))
    injector = FaultInjector(dist.rank)
    preemption = Preemption().install()  # before the loader forks its workers, which ignore the signals
    batches = iter(data)
    reduce = lambda values: all_reduce(values, dist)  # noqa: E731
    # each step is told to the audio encoders: SpecAugment's from_step
    audio_encoders = [m for m in engine.module.modules() if isinstance(m, AudioEncoder)]

    with loader_faults():  # a loader worker that dies stops the run in one line, wherever it is noticed
        while state.step < tcfg.steps:
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(tcfg.grad_accum)]
            loader_wait_s = time.perf_counter() - start
            step = state.step + 1
            logs_due = every(step, tcfg.log_every) or step in (1, tcfg.steps)
            for encoder in audio_encoders:
                encoder.step = step

            def judge(losses: list[float]):
                injector.at("step", step)  # a fault due mid-step: after the forward, before the backward and the update
                return guard.judge(losses, reduce, dist.rank, dist.world_size) if guard.enabled else None

            result = engine.train_step(micro_batches, judge=judge, loss_factor=injector.loss_factor(step),
                                       grad_norms=diagnostics.grad_norms and logs_due)
            state.step = step
            real = sum(b["num_real_tokens"] for b in micro_batches)
            positions = sum(b["input_ids"].numel() for b in micro_batches)
            samples = sum(len(b["samples"]) for b in micro_batches)
            loss_sum, real, positions, samples, preempted = all_reduce(
                [result["loss"], real, positions, samples, float(preemption.requested)], dist)
            step_s = time.perf_counter() - start
            skipped = result["skipped"]
            logs_step = logs_due or skipped is not None
            state.tokens_seen += int(real)
            state.samples_seen += int(samples)
            row = {"step": state.step, "loss": loss_sum / dist.world_size, "lr": result["lr"], "grad_norm": result["grad_norm"],
                   "tokens_per_s": real / step_s, "real_token_fraction": real / positions, "loader_wait_s": loader_wait_s,
                   "step_s": step_s, "tokens_seen": state.tokens_seen,
                   "samples_seen": state.samples_seen}
            if result["aux"]:
                names = sorted(result["aux"])
                values = all_reduce([result["aux"][n] for n in names], dist)
                row.update({name: value / dist.world_size for name, value in zip(names, values)})
            if "module_grad_norms" in result:
                row.update({f"grad_norm/{name}": value for name, value in result["module_grad_norms"].items()})
                row.update({f"grad_norm/features/{name}": value for name, value in result["feature_grad_norms"].items()})
            for task, (task_loss, count) in result.get("task_losses", {}).items():
                entry = task_losses.setdefault(task, [0.0, 0.0])
                entry[0], entry[1] = entry[0] + task_loss, entry[1] + count
            if guard.enabled:
                row["skipped_steps"] = guard.skipped + (skipped is not None)
            if skipped is not None:
                logger.write(f"step {step}: skipped, no update on any rank: {skipped} (bad_steps.jsonl)")
                if dist.rank in result["bad_ranks"] or (not result["bad_ranks"] and dist.is_main):
                    record_step(output_dir / "bad_steps.jsonl", step, dist.rank, micro_batches,
                                reason=skipped, loss=result["loss"] if result["loss"] == result["loss"] else None)
            if tcfg.log_samples:
                record_step(output_dir / "samples.jsonl", step, dist.rank, micro_batches, skipped=skipped is not None)

            if evaluator is not None and every(state.step, tcfg.eval_every):
                eval_loss = evaluator(engine)
                if eval_loss is not None:
                    row["eval_loss"] = eval_loss
                    logger.write(f"step {state.step}: eval loss {eval_loss:.4f}")
            due = probes_due(cfg.probes, state.step, final=state.step == tcfg.steps)
            if due:
                probe_model = engine.full_model(replica)
                probe_rows = run_probes(probe_model, due, data_cfg=cfg.data, tokenizer=tokenizer, dist=dist,
                                        step=state.step, output_dir=output_dir)
                row.update({f"probe/{r['probe']}/{r['metric']}": r["value"] for r in probe_rows  # clean: not a degraded pass's
                            if r["task"] == "all" and r["language"] == "all" and r.get("degradation", "none") == "none"})
                if state.step == tcfg.steps and probe_rows:
                    logger.write(format_table(probe_rows))
            relies = evaluator is not None and every(state.step, diagnostics.reliance_every)
            if relies:  # the same eval batches, each modality's features replaced by their mean (diagnostics.py)
                reliance = measure_reliance(engine, evaluator.load(), dist)
                flags, alarms = collapse.update(state.step, reliance)
                row.update(reliance)
                row.update(flags)
                for line in alarms:
                    logger.write(line)
            if logs_step or "eval_loss" in row or due or relies:
                (row["max_rss_mb"],) = all_reduce([max_rss_mb()], dist, op="max")  # the same decision on every rank
                if diagnostics.loss_share:
                    row.update(loss_share_metrics(task_losses, dist))
                    task_losses.clear()
                logger.log(row)
            logger.progress(state.step, row)
            guard.record(step, skipped, loss_sum / dist.world_size)  # RunStopped after max_bad_steps in a row
            if every(state.step, tcfg.checkpoint_every) or state.step == tcfg.steps or preempted:
                state.guard = guard.state_dict()
                path = save_checkpoint(engine, state, data, cfg, dist, config_yaml, injector)
                logger.write(f"step {state.step}: checkpoint {path}")
            if preempted:
                logger.write(f"step {state.step}: stopping on a preemption signal "
                             f"({preemption.name or 'received by another rank'}); continue with train.resume=auto")
                break

    preemption.uninstall()
    logger.close()
    shutdown(engine, dist)
    return state


@contextlib.contextmanager
def loader_faults():
    """A loader worker that died (the OOM killer, a signal) becomes one line. torch notices it in its SIGCHLD
    handler, which raises wherever the main thread is (a forward, a collective), or when the next batch is due."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise RunStopped(f"a data loader worker died ({str(e).strip().splitlines()[0]}): out of memory? "
                         f"Lower data.num_workers or data.decode_cache_mb, then continue with train.resume=auto",
                         every_rank=False) from None


def record_step(path: Path, step: int, rank: int, micro_batches: list[dict], **fields) -> None:
    """One line for a rank's step: `fields` and the samples of its batch (shard:key, and the epoch they were read in)."""
    line = json.dumps({"step": step, "rank": rank, **fields,
                       "samples": [f"{s['shard']}:{s['key']}" for b in micro_batches for s in b["samples"]],
                       "epochs": [s["epoch"] for b in micro_batches for s in b["samples"]]})
    with open(path, "a", encoding="utf-8") as f:  # O_APPEND: the ranks' lines stay whole
        f.write(line + "\n")
