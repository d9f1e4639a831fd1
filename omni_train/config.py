"""Recipes: YAML merged over the config dataclasses, then dotted command-line overrides.

    cfg = load_recipe("recipes/smoke.yaml", ["data.seq_len=1024", "seed=3"])

The schema is a tree of plain kw_only dataclasses, each defined next to the code it configures
(`DataConfig` in `data/pipeline.py`, `AudioConfig` in `data/audio.py`, ...). OmegaConf does the
merge and type checks; each dataclass validates its own fields in `__post_init__`. Any problem
stops before work starts with a `RecipeError` whose one line names the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from omni_train.data.pipeline import DataConfig
from omni_train.model.omni import OmniConfig
from omni_train.probes.runner import ProbeConfig
from omni_train.train.loop import TrainConfig
from omni_train.train.lora import check_lora_fusion
from omni_train.train.runs import InitConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the key."""


@dataclasses.dataclass(kw_only=True)
class RecipeConfig:
    name: str
    output_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    data: DataConfig
    model: OmniConfig
    init: InitConfig = dataclasses.field(default_factory=InitConfig)  # start from a run's checkpoint (train/runs.py)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    probes: list[ProbeConfig] = dataclasses.field(default_factory=list)  # run during training and by `omni-train probe`

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty run name without '/', got {self.name!r}")
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        if self.model.pretrained:
            from omni_train.model.qwen2_5_omni import pretrained_data_fields

            if self.data.tokenizer == "byte":
                self.data.tokenizer = self.model.pretrained  # an Omni checkpoint's tokenizer and chat markers come with it
            # the thinker's preprocessing (transformers' processor): the token counts its encoders produce, its patches
            for section, fields in pretrained_data_fields(self.model.pretrained).items():
                setattr(self.data, section, dataclasses.replace(getattr(self.data, section), **fields))
        self.data.positions = self.model.positions  # the data layer renders the positions the model applies
        if self.model.fusion == "resampler" and self.model.resampler.span_s is not None:
            from omni_train.model.resampler import span_tokens_of

            audio = self.data.audio
            self.model.resampler.span_tokens = span_tokens_of(
                self.model.resampler.span_s, audio.sample_rate_hz / (audio.hop_length * audio.downsample))
        # the data layer reserves as many placeholders per media item as the model's fusion makes of it
        self.data.sequence_tokens = self.model.sequence_tokens()
        check_model_matches_data(self.model, self.data)
        check_lora_fusion(self.train.lora, self.model.fusion, self.train.modules)  # a fusion trains whole (lora.py)


def check_model_matches_data(model: OmniConfig, data: DataConfig) -> None:
    """The encoders must expect what the data layer produces; say which keys disagree."""
    if data.video.use_audio_in_video and model.positions == "mrope":
        raise ValueError("data.video.use_audio_in_video=true needs model.positions tmrope or tmrope_qwen3 (or 1d), not mrope: "
                         "audio in video shares TMRoPE's time axis with the frames")
    if data.video.use_audio_in_video and data.sequence_tokens.kind != "encoder":
        what = f"model.fusion={model.fusion}" if model.fusion != "interleave" else "model.projector pool"
        raise ValueError(f"data.video.use_audio_in_video=true is not supported with {what} (audio in video "
                         "interleaves the encoders' tokens; it needs model.fusion interleave with an mlp or linear projector)")
    if data.video.use_audio_in_video and model.transfer.kind != "none":
        raise ValueError(f"data.video.use_audio_in_video=true is not supported with model.transfer.kind="
                         f"{model.transfer.kind} (it replaces whole audio spans; audio in video is interleaved)")
    pairs = []
    if model.audio is not None:
        pairs += [("model.audio.num_mel_bins", model.audio.num_mel_bins, "data.audio.num_mel_bins", data.audio.num_mel_bins),
                  ("model.audio.window_frames", model.audio.window_frames, "data.audio.window_s / hop", data.audio.window_frames),
                  ("model.audio.conv1_stride * 2 * pool", model.audio.downsample, "data.audio.downsample",
                   data.audio.downsample),
                  ("model.audio.pool_tail", model.audio.pool_tail, "data.audio.pool_tail", data.audio.pool_tail)]
        # tokens per window are counted per chunk where a chunk's positions do not tile its window (Qwen3-Omni: 13 per 1 s)
        chunk = model.audio.chunk_frames
        if data.audio.chunk_frames is not None or (chunk is not None and chunk % model.audio.downsample):
            pairs.append(("model.audio.chunk_frames", chunk, "data.audio.chunk_frames", data.audio.chunk_frames))
    if model.vision is not None:
        pairs += [("model.vision.patch_size", model.vision.patch_size, "data.image.patch_size", data.image.patch_size),
                  ("model.vision.merge_size", model.vision.merge_size, "data.image.merge_size", data.image.merge_size),
                  ("model.vision.temporal_patch_size", model.vision.temporal_patch_size, "data.video.temporal_patch_size",
                   data.video.temporal_patch_size)]
    for model_key, model_value, data_key, data_value in pairs:
        if model_value != data_value:
            raise ValueError(f"{model_key}={model_value} does not match {data_key}={data_value}")


def _one_line(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {first}" if key else first


def _instantiate(cls: type, node: Any, path: str) -> Any:
    """Build dataclass `cls` from a resolved plain dict, bottom-up, so a validation error names its dotted key."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in node:
            continue
        kwargs[field.name] = _convert(hints[field.name], node[field.name], f"{path}{field.name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(_name_key(str(e), path.rstrip("."), cls)) from None


def _name_key(message: str, where: str, cls: type) -> str:
    """Make a dataclass's validation message start with the full dotted key it is about."""
    if not where or message.startswith(where):
        return message
    last = where.rpartition(".")[2].split("[")[0]
    if message.startswith(last + "."):  # "audio.n_fft must ..." under data.audio
        return where[: len(where) - len(where.rpartition(".")[2])] + message
    for field in dataclasses.fields(cls):
        if message.startswith((field.name + " ", field.name + "[")):  # "degrade[1].kbps must ..." under probes[0]
            return f"{where}.{message}"
    return f"{where}: {message}"


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _instantiate(hint, value, path + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_instantiate(args[0], item, f"{path}[{i}].") for i, item in enumerate(value)]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {key: _instantiate(args[1], item, f"{path}.{key}.") for key, item in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _instantiate(arg, value, path + ".")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} is not key=value (for example train.steps=200)")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def preset_path(preset: str) -> Path:
    """model.preset -> configs/model/<preset>.yaml (in the working directory, else in the repository), or a path."""
    candidates = [Path(preset)] if preset.endswith((".yaml", ".yml")) else [
        Path("configs/model") / f"{preset}.yaml", REPO_ROOT / "configs" / "model" / f"{preset}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in (REPO_ROOT / "configs" / "model").glob("*.yaml"))
    raise RecipeError(f"model.preset: no preset {preset!r} (configs/model has {', '.join(known)})")


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{what} {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(text, dict):
        raise RecipeError(f"{what} {path}: expected a mapping of keys at the top level")
    return text


# What a fine-tune takes over from the run named by init.run: the model its weights belong to, and the
# tokenizer and media settings that model was trained with.
INHERITED_FROM_INIT_RUN = {"model": None, "data": ("tokenizer", "audio", "image", "video")}


def inherited_from_run(run: str) -> dict:
    """The init.run base run's model, tokenizer and media settings, as a layer to merge under the recipe."""
    config = Path(run) / "config.yaml"
    if not config.is_file():
        raise RecipeError(f"init.run: {run} is not a run directory (no config.yaml)")
    text = _read_yaml(config, "init.run config")
    layer = {}
    for section, keys in INHERITED_FROM_INIT_RUN.items():
        values = text.get(section) or {}
        layer[section] = values if keys is None else {k: values[k] for k in keys if k in values}
    return layer


def load_recipe(path: str | Path | None, overrides: list[str] = (), *, schema: type = RecipeConfig) -> Any:
    """Recipe file + overrides -> validated `schema` instance, or `RecipeError` naming the key.

    Layers, later winning: dataclass defaults, the model preset (configs/model/<model.preset>.yaml),
    with `init.run` set the base run's model, tokenizer and media settings (INHERITED_FROM_INIT_RUN),
    the recipe file, the command-line overrides.
    """
    base = OmegaConf.structured(schema)
    parsed = [parse_override(o) for o in overrides]
    try:
        text: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise RecipeError(f"recipe {path} does not exist")
            text = _read_yaml(path, "recipe")
        if "model" in {f.name for f in dataclasses.fields(schema)}:
            preset = dict(parsed).get("model.preset") or (text.get("model") or {}).get("preset") or "tiny"
            base = OmegaConf.merge(base, {"model": _read_yaml(preset_path(str(preset)), "model preset")})
        init_run = dict(parsed).get("init.run", (text.get("init") or {}).get("run"))
        if init_run and "init" in {f.name for f in dataclasses.fields(schema)}:
            base = OmegaConf.merge(base, inherited_from_run(str(init_run)))
        base = OmegaConf.merge(base, text)
        for key, value in parsed:
            OmegaConf.update(base, key, value, merge=True)
        resolved = OmegaConf.to_container(base, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise RecipeError(_one_line(e)) from None
    return _instantiate(schema, resolved, "")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (written to the run directory and stored in checkpoints)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
