"""Export a run's checkpoint as a self-contained directory, and load it back.

    omni-train export --run runs/meeting-finetune --out exports/meeting [--step S] [--merge-lora | --keep-lora]

    from omni_train.export import load_exported
    model, tokenizer, cfg = load_exported("exports/meeting")    # OmniModel in eval mode, on the CPU

The directory (Hugging Face layout; nothing in it is pickled):
    config.json                  {"format": "omni_train", "model": the resolved model config, "data": the
                                  media settings the model was trained with, "source": run, step, lora}
    model.safetensors            every weight of the model (LoRA merged in, or the base under --keep-lora)
    tokenizer files              whatever `Tokenizer.save` writes (omni_tokenizer.json, tokenizer.model, tokenizer.json ...)
    adapter_config.json          --keep-lora only: peft's LoraConfig of the adapters
    adapter_model.safetensors    --keep-lora only: the adapters in peft's layout (`<layer>.lora_A.weight`)

`--merge-lora` (the default) folds the adapters into the weights (W + B A alpha / r): one plain
model. `--keep-lora` keeps base and adapters apart, for swapping adapters on one base; peft can
read the two adapter files. A run without LoRA exports its weights either way.

The model config is the built model's (`model.cfg`: vocabulary and any pretrained component's
shape filled in) with every `pretrained*` path cleared, so loading never reads anything outside
the directory.

`--format hf` writes a run that started from `model.pretrained` (a Qwen2.5-Omni or Qwen3-Omni directory)
back in that model's release layout, LoRA merged: transformers (`Qwen2_5OmniForConditionalGeneration`,
`Qwen3OmniMoeForConditionalGeneration` and their thinker classes) and vLLM load it
(`qwen2_5_omni.save_release` says what is written). `omni_train_export.json` beside it records the source run and step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_train.data.audio import AudioConfig
from omni_train.data.image import ImageConfig
from omni_train.data.video import VideoConfig
from omni_train.model.omni import OmniConfig

FORMAT = "omni_train"
FORMATS = (FORMAT, "hf")
CONFIG_FILE = "config.json"
HF_MARKER_FILE = "omni_train_export.json"  # beside an --format hf export: {"format": "hf", "source": {...}}
WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(kw_only=True)
class MediaConfig:
    """The preprocessing the exported model expects (the run's data.audio / image / video)."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)


@dataclass(kw_only=True)
class ExportConfig:
    format: str
    model: OmniConfig
    data: MediaConfig = field(default_factory=MediaConfig)
    source: dict[str, Any] = field(default_factory=dict)  # run, step, lora: merged | separate | none

    def __post_init__(self):
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")


def _model_config(model: nn.Module) -> dict:
    """The built model's config with the pretrained_* paths cleared (their weights are in the export)."""
    cfg = dataclasses.asdict(model.cfg)
    for name in cfg:
        if name.startswith("pretrained"):
            cfg[name] = None
    return cfg


def export_run(run: str | Path, out: str | Path, *, step: int | None = None, merge_lora: bool = True,
               overwrite: bool = False, format: str = FORMAT) -> Path:
    """Write the export directory `out` for `run`'s checkpoint (the latest unless `step`); see the module docstring."""
    from omni_train.train.lora import adapted_targets, adapter_state_dict, has_lora, peft_config, remove_lora
    from omni_train.train.runs import load_run

    out = Path(out)
    check_export_target(out, run, overwrite=overwrite)
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "hf" and not merge_lora:
        raise ValueError("--format hf merges LoRA into the weights: --keep-lora applies to the omni_train format only")
    model, cfg, tokenizer, checkpoint = load_run(run, step)
    if format == "hf" and not cfg.model.pretrained:
        raise ValueError(f"--format hf: {run} did not start from model.pretrained (a Qwen2.5-Omni or Qwen3-Omni directory), so there "
                         f"is no release layout to write; export it in the omni_train format")
    if format == "hf" and (cfg.model.fusion != "interleave" or "pool" in cfg.model.projector_kinds().values()):
        raise ValueError(f"--format hf: {run} uses model.fusion={cfg.model.fusion} with projectors "
                         f"{cfg.model.projector_kinds()}, which the Qwen2.5-Omni layout has no place for; export it in "
                         f"the omni_train format")
    lora = has_lora(model)
    adapters = None
    if lora and not merge_lora:
        adapters = (peft_config(cfg.train.lora, adapted_targets(model)), adapter_state_dict(model))
    if lora:
        remove_lora(model, merge=merge_lora)
    source = {"run": str(run), "step": int(checkpoint.name.removeprefix("step_")),
              "lora": ("merged" if merge_lora else "separate") if lora else "none"}
    if format == "hf":
        from omni_train.model.qwen2_5_omni import save_release

        def write_hf(tmp: Path) -> None:
            save_release(model.state_dict(), cfg.model.pretrained, tmp, backbone=model.cfg.backbone)
            (tmp / HF_MARKER_FILE).write_text(json.dumps({"format": "hf", "source": {**source,
                                                                                     "pretrained": cfg.model.pretrained}}))

        return replace_atomically(out, write_hf)
    return write_export(model, tokenizer, cfg.data, out, source=source, adapters=adapters)


def is_export(directory: Path) -> bool:
    """Whether `directory` holds an omni_train export (its config.json says so)."""
    for name in (CONFIG_FILE, HF_MARKER_FILE):
        try:
            if json.loads((directory / name).read_text()).get("format") in FORMATS:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def check_export_target(out: Path, run: str | Path, *, overwrite: bool) -> None:
    """Refuse an --out whose replacement would lose anything: a file, a non-empty folder without --overwrite,
    and even with it any folder that is not an earlier export, or that is (or holds) a run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace an earlier export)")
    resolved, run_dir = out.resolve(), Path(run).resolve()
    if resolved == run_dir or resolved in run_dir.parents:
        raise ValueError(f"--out {out} is or holds the run {run}: refusing to replace it")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        raise ValueError(f"--out {out} is a run directory (config.yaml / checkpoints/): refusing to replace it")
    if not is_export(out):
        raise ValueError(f"--out {out} is not an earlier omni_train export (no {CONFIG_FILE} with format "
                         f"{FORMAT!r}): refusing to replace it; choose an empty or new --out")


def write_export(model: nn.Module, tokenizer: Any, data_cfg: Any, out: Path, *, source: dict[str, Any],
                 adapters: tuple[Any, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `model` (without LoRA layers), its tokenizer and media settings as an export directory, replacing `out`
    atomically (written into a fresh hidden folder beside it, then renamed); `adapters`: (peft LoraConfig, adapter
    state) kept apart. Callers decide whether `out` may be replaced (`check_export_target`)."""
    return replace_atomically(out, lambda tmp: _write_export_files(model, tokenizer, data_cfg, tmp, source=source,
                                                                   adapters=adapters))


def replace_atomically(out: Path, write: Any) -> Path:
    """Run `write(tmp)` on a fresh hidden folder beside `out`, then rename it into place (an old `out` renamed away first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # swap: the old export is renamed away before the new one takes its name
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _write_export_files(model: nn.Module, tokenizer: Any, data_cfg: Any, tmp: Path, *, source: dict[str, Any],
                        adapters: tuple[Any, dict[str, torch.Tensor]] | None) -> None:
    from safetensors.torch import save_file

    if adapters is not None:
        adapters[0].save_pretrained(str(tmp))
        save_file(adapters[1], str(tmp / ADAPTER_WEIGHTS_FILE))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    tokenizer.save(tmp)
    config = {"format": FORMAT, "model": _model_config(model),
              "data": {name: dataclasses.asdict(getattr(data_cfg, name)) for name in ("audio", "image", "video")},
              "source": source}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False))


def load_exported(directory: str | Path) -> tuple[nn.Module, Any, ExportConfig]:
    """(model in eval mode on the CPU, tokenizer, config) from an export directory; adapters kept apart are re-applied."""
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.lora import load_adapter_state_dict
    from omni_train.train.safe_load import read_safetensors

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an omni_train export (no {CONFIG_FILE} / {WEIGHTS_FILE})")
    cfg = load_recipe(directory / CONFIG_FILE, schema=ExportConfig)  # JSON is YAML: the recipe loader validates it
    tokenizer = Tokenizer.from_path(directory)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    _load_strict(model, read_safetensors(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        import peft

        peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(str(directory)), model)
        load_adapter_state_dict(model, read_safetensors(directory / ADAPTER_WEIGHTS_FILE))
    return model.eval(), tokenizer, cfg


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: the weights do not fit {CONFIG_FILE}'s model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {sorted(shapes)[:3]})")
    model.load_state_dict(state)


def export_cli(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, step=args.step, merge_lora=not args.keep_lora, overwrite=args.overwrite,
                     format=args.format)
    config = json.loads((out / (HF_MARKER_FILE if args.format == "hf" else CONFIG_FILE)).read_text())
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"exported {config['source']['run']} step {config['source']['step']} (LoRA: {config['source']['lora']}) "
          f"to {out} ({size_mb:.1f} MiB)")
    return 0


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, batch: dict) -> float:
    """The largest absolute difference of two models' logits on one batch (the export parity check)."""
    return float((a(batch, return_logits=True).logits - b(batch, return_logits=True).logits).abs().max())
