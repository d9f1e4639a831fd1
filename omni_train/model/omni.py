"""The multimodal model: encoders -> projectors -> fusion -> shared backbone -> next-token loss.

`OmniModel.forward(batch)` reads the batch of `data.packing.collate_packed` (keys in the
README's batch table) and is the whole composition in one place:

    audio_mel (W, mels, T)        -> audio_encoder  -> audio_projector  -> (num audio tokens, D)
    image/video_patches (P, ...)  -> vision_encoder -> vision_projector -> (num image + video tokens, D)
        (projector pool: ceil(n / model.pool.factor) features per item of n encoder tokens, the
        projector grouping within each item by `batch[f"{m}_num_tokens"]`; projectors.py)
    fusion "interleave": the features replace the placeholder positions of their modality, in
        the row-major order of the batch (the order collate_packed lists the media in); the
        number of positions and of features must match, else ValueError with both counts
    fusion "resampler": each item, or each `model.resampler.span_s` span of an audio item, becomes
        Q learned-query tokens (`fusion.audio` / `fusion.vision`, resampler.py), interleaved as above
    fusion "cross_attn": the features stay out of the sequence, in a MediaMemory (B, M, D) with
        each token's document; every item keeps one anchor position (the pad embedding); gated
        cross-attention blocks (`fusion`, cross_attention.py) run after every k-th backbone layer,
        each position reading only its own document's media anchored at or before it
    transfer (model.transfer, optional): e.g. token_rate shortens audio spans to one vector per
        recognized token and repacks the rows; its auxiliary losses join the loss (transfer.py)
    backbone(inputs_embeds, position_ids, document_ids[, after_layer: the cross_attn blocks]) -> hidden (B, L, D)
    loss: position t predicts labels[t + 1] when t + 1 is in the same document; mean over the
        positions that have a target (assistant tokens)

Distributed-safety rule: every encoder and every projector runs exactly once per forward, also
when the batch holds none of its modality (it then runs on `dummy_input()`, one short window
or one 2x2 block of zero patches, and `0.0 * features.sum()` is added to the embeddings).
Images and videos go through the vision encoder together, in one call. So under DeepSpeed
ZeRO-3 every rank gathers the same parameters in the same order whatever its batch holds (a
rank whose batch has no video cannot leave the others waiting in an all-gather), and every
parameter gets a gradient, zero where its modality was absent, on every rank (DDP's reducer
and ZeRO's gradient partitioning expect one for each). The cross_attn blocks run on every forward
too, on a dummy memory that no position reads when the batch has no media; so does each resampler,
on one zero feature, when the batch has none of its modalities.

How many placeholders an item has is the data layer's `data.sequence_tokens`, which the recipe
loader derives from this config (`OmniConfig.sequence_tokens`); `batch[f"{m}_seq_tokens"]` is checked
per item against the positions the model makes (ValueError naming both), and features are grouped
with the same `data.sequence_tokens.group_sizes` the chat template reserved them with.

Submodule names (`audio_encoder`, `vision_encoder`, `audio_projector`, `vision_projector`,
`vision_deepstack`, `backbone`, `transfer`, `fusion`) are what the training engine groups parameters by.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.data.audio import AudioConfig
from omni_train.data.positions import check_model_positions
from omni_train.data.sample import MODALITY_IDS
from omni_train.data.sequence_tokens import SequenceTokens, group_sizes, sequence_token_count
from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig
from omni_train.model.backbone import Backbone, BackboneConfig
from omni_train.model.cross_attention import CrossAttentionBlocks, CrossAttnConfig, MediaMemory, build_memory
from omni_train.model.projectors import PoolConfig, ProjectorOptions, build_projector, check_projector_kind
from omni_train.model.resampler import Resampler, ResamplerConfig
from omni_train.model.transfer import TransferConfig, build_transfer
from omni_train.model.vision_encoder import VisionEncoder, VisionEncoderConfig

FUSIONS = ("interleave", "cross_attn", "resampler")
MEDIA = ("audio", "image", "video")
IGNORE_INDEX = -100  # labels without loss (data.packing.IGNORE_INDEX)


@dataclass(kw_only=True)
class OmniConfig:
    backbone: BackboneConfig
    audio: AudioEncoderConfig | None = None    # None: a model without audio input
    vision: VisionEncoderConfig | None = None  # None: a model without image or video input
    projector: str = "mlp"                     # projectors.PROJECTOR_KINDS
    fusion: str = "interleave"                 # FUSIONS
    activation_checkpointing: bool = False     # recompute every encoder and backbone layer in backward
    preset: str = "tiny"                       # configs/model/<preset>.yaml, merged under the recipe's model section
    pretrained_backbone: str | None = None     # local HF Qwen2/Qwen3 directory; its config replaces `backbone`
    pretrained_audio: str | None = None        # local HF Whisper directory: replaces `audio`, keeping its downsample
    pretrained_vision: str | None = None       # local HF SigLIP directory: replaces `vision`, keeping its patch layout
    # A local Qwen2.5-Omni directory (release layout or a saved thinker): its thinker replaces backbone, encoders,
    # projectors and positions; build_model loads its weights (qwen2_5_omni.py)
    pretrained: str | None = None
    audio_projector: ProjectorOptions = field(default_factory=ProjectorOptions)   # None fields: `projector`'s defaults
    vision_projector: ProjectorOptions = field(default_factory=ProjectorOptions)
    transfer: TransferConfig = field(default_factory=TransferConfig)  # cross-modal transfer mechanism (transfer.py)
    cross_attn: CrossAttnConfig = field(default_factory=CrossAttnConfig)  # the blocks of fusion cross_attn
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)  # fusion resampler's block (resampler.py)
    pool: PoolConfig = field(default_factory=PoolConfig)  # the pool projector's factor (projectors.py)
    # 1d | mrope | tmrope (data/positions.py): rendered per document by the data layer, applied by the backbone
    # (3-D ones need backbone.mrope_section); the recipe loader hands it to the data layer (data.positions)
    positions: str = "1d"

    def __post_init__(self):
        check_projector_kind(self.projector)
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        self._pretrained_encoder_configs()
        check_model_positions(self.positions, self.backbone.mrope_section, self.transfer.kind)
        if self.fusion == "cross_attn":  # 3-D positions and transfer mechanisms: refused in _check_sequence_tokens
            self.cross_attn.check(self.backbone)
        if self.transfer.kind != "none" and self.audio is None:
            raise ValueError(f"model.transfer.kind={self.transfer.kind} needs an audio encoder, but model.audio is not set")
        if self.vision is not None and self.vision.deepstack_layers:
            if self.fusion != "interleave" or self.projector_kinds()["image"] == "pool" or self.transfer.kind != "none":
                raise ValueError("model.vision.deepstack_layers adds features at the visual positions of the sequence: it "
                                 "needs model.fusion interleave, a vision projector that is not pool and "
                                 f"model.transfer.kind none, got {self.fusion}, {self.projector_kinds()['image']} and "
                                 f"{self.transfer.kind}")
            if len(self.vision.deepstack_layers) > self.backbone.num_layers:
                raise ValueError(f"model.vision.deepstack_layers has {len(self.vision.deepstack_layers)} layers, more than "
                                 f"the backbone's {self.backbone.num_layers} to add them after")
        self._check_sequence_tokens()

    def projector_kinds(self) -> dict[str, str]:
        """The projector kind of each modality: its own (model.audio_projector / vision_projector.kind) or model.projector."""
        return {"audio": self.audio_projector.kind or self.projector, "image": self.vision_projector.kind or self.projector,
                "video": self.vision_projector.kind or self.projector}

    def sequence_tokens(self) -> SequenceTokens:
        """The backbone positions each media item takes with this fusion and these projectors (data.sequence_tokens)."""
        if self.fusion == "cross_attn":
            return SequenceTokens(kind="anchor")
        if self.fusion == "resampler":
            return SequenceTokens(kind="resampler", queries=self.resampler.queries, span_tokens=self.resampler.span_tokens)
        pooled = [m for m, kind in self.projector_kinds().items() if kind == "pool"]
        if pooled:
            return SequenceTokens(kind="pool", factor=self.pool.factor, modalities=pooled)
        return SequenceTokens()

    def _check_sequence_tokens(self) -> None:
        """Refuse the combinations that need media as their encoder tokens (one line naming the keys)."""
        pooled = [m for m, kind in self.projector_kinds().items() if kind == "pool"]
        if pooled and self.fusion != "interleave":
            raise ValueError(f"model.projector pool (model.projector / model.audio_projector.kind / "
                             f"model.vision_projector.kind) needs model.fusion interleave, not {self.fusion}")
        kind = self.sequence_tokens().kind
        if kind == "encoder":
            return
        what = f"model.fusion={self.fusion}" if self.fusion != "interleave" else "model.projector pool"
        if self.positions != "1d":
            raise ValueError(f"{what} changes the number of media positions; it does not support "
                             f"model.positions={self.positions} (use model.positions: 1d)")
        if self.transfer.kind != "none":
            raise ValueError(f"model.transfer.kind={self.transfer.kind} splits audio by its encoder tokens; it does not "
                             f"support {what} (use model.transfer.kind: none)")
        if self.fusion == "resampler" and self.backbone.dim % self.resampler.heads:
            raise ValueError(f"model.resampler.heads={self.resampler.heads} must divide model.backbone.dim="
                             f"{self.backbone.dim}")

    def _pretrained_encoder_configs(self) -> None:
        """Encoder configs from the pretrained directories' config.json, so the data checks see the real architecture.

        What the data layer fixes is kept from `audio` / `vision` (frames per token; temporal patch
        and merge size), the rest comes from the checkpoint. Weights are loaded by build_model.
        """
        from omni_train.model.hf_adapters import siglip_vision_config, whisper_encoder_config
        from omni_train.model.qwen2_5_omni import read_omni_checkpoint, thinker_model_fields

        # a training option, not architecture: the recipe's model.audio.spec_augment outlives the checkpoint's config
        spec_augment = self.audio.spec_augment if self.audio is not None else None
        if (self.pretrained or self.pretrained_audio) and self.audio is not None and self.audio.conv_kernel:
            raise ValueError(f"model.audio.conv_kernel={self.audio.conv_kernel} adds convolution blocks that a pretrained "
                             f"audio encoder does not have: leave it at 0 with model.pretrained or pretrained_audio")
        for name, off in (("mel_norm", "none"), ("mel_lifter", 0)):  # feature transforms: off for a pretrained encoder
            if (self.pretrained or self.pretrained_audio) and self.audio is not None and getattr(self.audio, name) != off:
                raise ValueError(f"model.audio.{name}={getattr(self.audio, name)} changes the features a pretrained audio "
                                 f"encoder was trained on: leave it at {off} with model.pretrained or pretrained_audio")
        if self.pretrained:
            if self.pretrained_backbone or self.pretrained_audio or self.pretrained_vision:
                raise ValueError("model.pretrained (a whole Omni thinker) excludes model.pretrained_backbone, "
                                 "pretrained_audio and pretrained_vision")
            try:
                for name, value in thinker_model_fields(read_omni_checkpoint(self.pretrained)).items():
                    setattr(self, name, value)
            except (OSError, ValueError) as e:
                raise ValueError(f"model.pretrained: {e}") from None
        try:
            if self.pretrained_audio:
                downsample = self.audio.downsample if self.audio is not None else AudioConfig().downsample
                self.audio = whisper_encoder_config(self.pretrained_audio, downsample=downsample)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.pretrained_audio: {e}") from None
        try:
            if self.pretrained_vision:
                layout = {} if self.vision is None else {"temporal_patch_size": self.vision.temporal_patch_size,
                                                         "merge_size": self.vision.merge_size}
                self.vision = siglip_vision_config(self.pretrained_vision, **layout)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.pretrained_vision: {e}") from None
        if self.audio is not None and spec_augment is not None:
            self.audio = dataclasses.replace(self.audio, spec_augment=spec_augment)


@dataclass
class FusedInputs:
    embeds: torch.Tensor          # (B, L, D) backbone input
    position_ids: torch.Tensor    # (B, L) or (3, B, L)
    document_ids: torch.Tensor    # (B, L), -1 on padding
    labels: torch.Tensor          # (B, L), IGNORE_INDEX where no loss
    aux_loss: torch.Tensor | float = 0.0                  # auxiliary losses of a fusion/transfer mechanism
    aux: dict[str, float] = field(default_factory=dict)   # their values, for metrics.jsonl
    memory: MediaMemory | None = None                     # fusion cross_attn: the media the blocks read
    deepstack: list[torch.Tensor] | None = None           # model.vision.deepstack_layers: (B, L, D) added after layer j


@dataclass
class OmniOutput:
    loss: torch.Tensor            # () mean next-token cross-entropy over the loss tokens (0 when there are none)
    num_loss_tokens: int          # positions with a target, the loss's denominator
    per_token_loss: torch.Tensor  # (B, L) float32: at t, the loss of predicting labels[t]; 0 where there is none
    logits: torch.Tensor | None = None  # (B, L, vocab): at t, the prediction of token t + 1; with return_logits
    aux: dict[str, float] = field(default_factory=dict)  # auxiliary loss terms, already included in `loss`
    lm_loss: torch.Tensor | None = None  # () the next-token loss alone (held-out eval reports this)


class OmniModel(nn.Module):
    """Modality encoders and projectors in front of the shared decoder backbone; see the module docstring."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        self.cfg = cfg
        dim, checkpointing = cfg.backbone.dim, cfg.activation_checkpointing
        self.audio_encoder = self.audio_projector = self.vision_encoder = self.vision_projector = None
        if cfg.audio is not None:
            self.audio_encoder = AudioEncoder(cfg.audio, activation_checkpointing=checkpointing)
            self.audio_projector = build_projector(cfg.projector, cfg.audio.dim, dim, options=cfg.audio_projector,
                                                   pool_factor=cfg.pool.factor)
        if cfg.vision is not None:
            self.vision_encoder = VisionEncoder(cfg.vision, activation_checkpointing=checkpointing)
            self.vision_projector = build_projector(cfg.projector, cfg.vision.out_dim, dim, input_norm=True,
                                                    options=cfg.vision_projector, pool_factor=cfg.pool.factor)
        self.backbone = Backbone(cfg.backbone, activation_checkpointing=checkpointing)
        # built last, so that kind none draws the same random initialization as before the option existed
        self.transfer = build_transfer(cfg.transfer, dim=dim, vocab_size=cfg.backbone.vocab_size,
                                       init_std=cfg.backbone.init_std)
        # deepstack (model.vision.deepstack_layers, Qwen3-Omni's merger_list): one projector per taken layer, an input
        # LayerNorm over the merged m^2 D (its "postshuffle" norm), hidden width m^2 D; absent (None) without deepstack
        self.vision_deepstack = None
        if cfg.vision is not None and cfg.vision.deepstack_layers:
            self.vision_deepstack = nn.ModuleList(
                build_projector("mlp", cfg.vision.out_dim, dim, input_norm=True,
                                options=ProjectorOptions(kind="mlp", hidden_dim=cfg.vision.out_dim))
                for _ in cfg.vision.deepstack_layers)
        self.fusion = None  # the fusion's own modules; after transfer, so interleave draws today's initialization
        if cfg.fusion == "cross_attn":
            self.fusion = CrossAttentionBlocks(cfg.cross_attn, cfg.backbone)
        elif cfg.fusion == "resampler":
            if cfg.resampler.span_s is not None and cfg.resampler.span_tokens is None:
                raise ValueError("model.resampler.span_s needs model.resampler.span_tokens, which the recipe loader "
                                 "derives from data.audio; set it when building an OmniConfig in code")
            # one resampler per encoder (images and videos share the vision one); fusion.audio / fusion.vision
            self.fusion = nn.ModuleDict({name: Resampler(cfg.resampler, dim, init_std=cfg.backbone.init_std)
                                         for name, encoder in (("audio", self.audio_encoder), ("vision", self.vision_encoder))
                                         if encoder is not None})
        # the placeholders each media item has in the batch (data.sequence_tokens, derived from this config)
        self.sequence_tokens = cfg.sequence_tokens()

    def forward(self, batch: dict[str, Any], *, return_logits: bool = False) -> OmniOutput:
        fused = self.fuse(batch)                                                 # encoders -> projectors -> fusion
        hidden = self.backbone(inputs_embeds=fused.embeds, position_ids=fused.position_ids,
                               document_ids=fused.document_ids,
                               after_layer=self.after_layer(fused.memory, fused.document_ids, fused.deepstack))  # (B, L, D)
        loss, num_loss_tokens, per_token_loss = self.next_token_loss(hidden, fused.labels, fused.document_ids)
        logits = self.backbone.logits(hidden) if return_logits else None
        aux_loss, aux = fused.aux_loss, dict(fused.aux)
        if moe := self.backbone.moe_terms():  # the router's terms (backbone.SparseMoE), weighted into the loss
            moe_cfg = self.cfg.backbone.moe
            aux_loss = aux_loss + moe_cfg.aux_loss_weight * moe["load_balance"] + moe_cfg.z_loss_weight * moe["z_loss"]
            load = moe.pop("load")  # (E,) each expert's share over the mean: moe/load/e000 ...
            aux.update({f"moe/{name}": float(value.detach()) for name, value in moe.items()})
            aux.update({f"moe/load/e{e:03d}": float(v) for e, v in enumerate(load.tolist())})
        return OmniOutput(loss=loss + aux_loss, num_loss_tokens=num_loss_tokens, per_token_loss=per_token_loss,
                          logits=logits, aux=aux, lm_loss=loss.detach())

    def fuse(self, batch: dict[str, Any]) -> FusedInputs:
        """Everything before the backbone: the input embeddings with media features in place, and the
        positions, documents and labels that go with them (generation starts from this too)."""
        features, unused, deepstack = self._encode(batch)                        # encoders -> projectors
        embeds = self.backbone.embed(batch["input_ids"])                         # (B, L, D)
        memory = None
        if self.cfg.fusion == "cross_attn":  # the media stay out of the sequence: the blocks read them in the backbone
            self._check_seq_tokens(batch, features)                              # one anchor per item
            memory = build_memory(features, {m: self._feature_counts(batch, m) for m in features}, batch["modality_ids"],
                                  batch["document_ids"], dim=embeds.shape[-1], dtype=embeds.dtype)
        else:
            if self.cfg.fusion == "resampler":  # each item (or audio span) -> Q learned-query tokens (resampler.py)
                features = self._resample(features, batch, unused)
            self._check_seq_tokens(batch, features)
            embeds = fuse_interleave(embeds, batch["modality_ids"], features)    # fusion
        if unused:  # modalities absent from this batch: keep their modules in the graph (module docstring)
            embeds = embeds + sum(0.0 * out.sum() for out in unused).to(embeds.dtype)
        fused = FusedInputs(embeds=embeds, position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                            labels=batch["labels"], memory=memory,
                            deepstack=deepstack_additions(embeds, batch["modality_ids"], deepstack))
        if self.transfer is not None:  # e.g. token_rate: a compressed speech prefix, rows repacked (transfer.py)
            fused = self.transfer.compress(fused, batch, features.get("audio"), self.backbone.embed_tokens)
        return fused

    def after_layer(self, media, document_ids: torch.Tensor, deepstack: list[torch.Tensor] | None = None) -> dict | None:
        """Backbone.forward's `after_layer`: the cross_attn blocks reading `media` (a MediaMemory, or the MediaCache of
        `fusion.cache`) from the positions of document_ids (B, L), or deepstack's (B, L, D) additions (FusedInputs),
        the j-th after layer j; None when there is neither."""
        if deepstack:
            return {j: functools.partial(torch.add, other=addition) for j, addition in enumerate(deepstack)}
        if self.cfg.fusion != "cross_attn":
            return None
        assert media is not None, "fusion cross_attn: no media memory (FusedInputs.memory)"
        return self.fusion.after_layer(media, document_ids)

    # > 0: the loss computes the logits of at most this many target positions at a time (model/loss.py);
    # a plain attribute the training engine sets from train.loss_chunk_tokens: it changes memory, not the model
    loss_chunk_tokens: int = 0

    def next_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                        document_ids: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Cross-entropy of predicting labels[t + 1] at t, never across a document: (mean, count, (B, L) per label position).

        Logits are computed only where there is a target: assistant tokens are a small part of a
        multimodal batch, and (B, L, vocab) fp32 logits would dominate the memory. With
        `loss_chunk_tokens` > 0 not even the (N, vocab) logits of those positions exist at once
        (`loss.linear_cross_entropy`): the same loss and gradients, chunk by chunk.
        """
        same_document = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, :-1] >= 0)
        targets = torch.where(same_document, labels[:, 1:], IGNORE_INDEX)        # (B, L - 1), at the predicting position
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        if self.loss_chunk_tokens:
            from omni_train.model.loss import linear_cross_entropy

            token_loss = linear_cross_entropy(hidden[rows, cols], self.backbone.output_weight(), targets[rows, cols],
                                              chunk_tokens=self.loss_chunk_tokens)  # (N,), as Backbone.logits + CE
        else:
            logits = self.backbone.logits(hidden[rows, cols])                     # (N, vocab)
            token_loss = F.cross_entropy(logits.float(), targets[rows, cols], reduction="none")  # (N,)
        per_token_loss = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        per_token_loss = per_token_loss.index_put((rows, cols + 1), token_loss)   # (B, L), at the label's position
        num_loss_tokens = int(rows.numel())
        return token_loss.sum() / max(num_loss_tokens, 1), num_loss_tokens, per_token_loss

    def encode_media(self, batch: dict[str, Any], *, pooled: bool = False) -> dict[str, torch.Tensor]:
        """Projected features of the modalities in the batch: {modality: (num_tokens, D)}, or (num_items, D) mean-pooled.

        Runs every encoder once, as forward does (safe under ZeRO-3 whatever the batch holds);
        probes wrap it in torch.no_grad(), a contrastive loss keeps the graph.
        """
        features, _, _ = self._encode(batch)
        if not pooled:
            return features
        return {modality: torch.stack([item.mean(dim=0) for item in feats.split(self._feature_counts(batch, modality))])
                for modality, feats in features.items()}

    def _projector(self, modality: str):
        return self.audio_projector if modality == "audio" else self.vision_projector

    def _feature_counts(self, batch: dict[str, Any], modality: str) -> list[int]:
        """Projected features per item of `modality`: its encoder tokens, or the pool projector's groups of them."""
        return self._projector(modality).num_outputs(batch[f"{modality}_num_tokens"].tolist())

    def _resample(self, features: dict[str, torch.Tensor], batch: dict[str, Any],
                  unused: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fusion resampler: {modality: (Q x groups, D)}; a resampler whose modalities are absent runs on a dummy group."""
        resampled = {}
        for name, modalities in (("audio", ("audio",)), ("vision", ("image", "video"))):
            if name not in self.fusion:
                continue
            present = [m for m in modalities if m in features]
            if not present:  # distributed-safety rule (module docstring): every module runs once per forward
                # dtype from parameters(), not from `.weight`: under ZeRO-3 reading a module's parameter
                # attribute in a forward gathers it on this rank alone (an "external parameter"), so the
                # ranks' all-gathers would no longer pair up
                dtype = next(self.fusion[name].parameters()).dtype
                dummy = torch.zeros(1, self.cfg.backbone.dim, dtype=dtype, device=batch["input_ids"].device)
                unused.append(self.fusion[name](dummy, [1]))
                continue
            sizes = {m: [g for n in batch[f"{m}_num_tokens"].tolist() for g in group_sizes(m, n, self.sequence_tokens)]
                     for m in present}  # the item's encoder tokens, or its audio spans
            out = self.fusion[name](torch.cat([features[m] for m in present]), [g for m in present for g in sizes[m]])
            resampled.update(zip(present, out.split([len(sizes[m]) * self.cfg.resampler.queries for m in present])))
        return resampled

    def _check_seq_tokens(self, batch: dict[str, Any], features: dict[str, torch.Tensor]) -> None:
        """Each item's placeholders (batch[f"{m}_seq_tokens"]) must be the positions the model makes of it."""
        for modality in features:
            expected = [sequence_token_count(modality, n, self.sequence_tokens)
                        for n in batch[f"{modality}_num_tokens"].tolist()]
            given = batch.get(f"{modality}_seq_tokens")
            if given is not None and given.tolist() != expected:
                raise ValueError(f"fusion: the batch's {modality} items have {given.tolist()} placeholder positions but "
                                 f"model.fusion={self.cfg.fusion} with these projectors makes {expected} of them; "
                                 "data.sequence_tokens disagrees with the model (load both from one recipe)")

    def _encode(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor],
                                                      dict[str, list[torch.Tensor]]]:
        """Run every encoder + projector once: ({present modality: (num_tokens, D)}, [outputs of dummy inputs],
        {image / video: [(num_tokens, D) per deepstack layer]}, empty without model.vision.deepstack_layers)."""
        for modality, key, module in (("audio", "audio_mel", self.audio_encoder), ("image", "image_patches", self.vision_encoder),
                                      ("video", "video_patches", self.vision_encoder)):
            if key in batch and module is None:
                raise ValueError(f"the batch has {modality} but the model has no encoder for it "
                                 f"(model.{'audio' if modality == 'audio' else 'vision'} is not set)")
        device = batch["input_ids"].device
        features: dict[str, torch.Tensor] = {}
        unused: list[torch.Tensor] = []
        deepstack: dict[str, list[torch.Tensor]] = {}
        if self.audio_encoder is not None:
            if "audio_mel" in batch:  # the items' token counts: the pool projector groups within each item only
                features["audio"] = self.audio_projector(self.audio_encoder(batch["audio_mel"], batch["audio_window_frames"],
                                                                            batch.get("audio_windows_per_item")),
                                                         batch["audio_num_tokens"].tolist())
            else:
                unused.append(self.audio_projector(self.audio_encoder(*self.audio_encoder.dummy_input(device))))
        if self.vision_encoder is not None:
            present = [m for m in ("image", "video") if f"{m}_patches" in batch]
            if present:  # one call for images and videos together: the same collectives on every rank
                patches = torch.cat([batch[f"{m}_patches"] for m in present])
                grid_thw = torch.cat([batch[f"{m}_grid_thw"] for m in present])
                num_tokens = [n for m in present for n in batch[f"{m}_num_tokens"].tolist()]
                encoded, levels = self._encode_vision(patches, grid_thw)
                out = self.vision_projector(encoded, num_tokens)
                sizes = [sum(self._feature_counts(batch, m)) for m in present]
                features.update(zip(present, out.split(sizes)))
                for level in levels:
                    for modality, part in zip(present, level.split(sizes)):
                        deepstack.setdefault(modality, []).append(part)
            else:
                encoded, levels = self._encode_vision(*self.vision_encoder.dummy_input(device))
                unused += [self.vision_projector(encoded), *levels]
        return features, unused, deepstack

    def _encode_vision(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The vision encoder's merged outputs, and each deepstack layer's through its projector ([] without)."""
        if self.vision_deepstack is None:
            return self.vision_encoder(patches, grid_thw), []
        encoded, taken = self.vision_encoder(patches, grid_thw, deepstack=True)
        return encoded, [projector(level) for projector, level in zip(self.vision_deepstack, taken)]

    def num_parameters(self) -> dict[str, int]:
        """Parameters per submodule (absent encoders count 0) and in total."""
        counts = {name: sum(p.numel() for p in module.parameters()) if module is not None else 0
                  for name, module in (("audio_encoder", self.audio_encoder), ("audio_projector", self.audio_projector),
                                       ("vision_encoder", self.vision_encoder), ("vision_projector", self.vision_projector),
                                       ("vision_deepstack", self.vision_deepstack),
                                       ("backbone", self.backbone), ("transfer", self.transfer), ("fusion", self.fusion))}
        counts["total"] = sum(counts.values())
        return counts


def deepstack_additions(embeds: torch.Tensor, modality_ids: torch.Tensor,
                        deepstack: dict[str, list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """{image / video: [(N_m, D) per deepstack layer]} -> [(B, L, D) per layer]: zeros but at the modality's placeholder
    positions (row-major, as fuse_interleave), which Backbone.forward adds after layer j (transformers'
    `_deepstack_process`); None when the batch has no image or video."""
    if not deepstack:
        return None
    num_levels = len(next(iter(deepstack.values())))
    additions = []
    for level in range(num_levels):
        addition = torch.zeros_like(embeds)
        for modality, levels in deepstack.items():
            positions = (modality_ids == MODALITY_IDS[modality]).nonzero(as_tuple=True)
            addition = addition.index_put(positions, levels[level].to(embeds.dtype))
        additions.append(addition)
    return additions


def fuse_interleave(embeds: torch.Tensor, modality_ids: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Put each modality's features (N_m, D) at its placeholder positions of embeds (B, L, D), in row-major order.

    ValueError when a modality's placeholder positions and features differ in number (a feature
    count of 0 for a modality the batch brought no media for).
    """
    for modality in MEDIA:
        positions = (modality_ids == MODALITY_IDS[modality]).nonzero(as_tuple=True)  # row-major
        num_features = features[modality].shape[0] if modality in features else 0
        if positions[0].numel() != num_features:
            raise ValueError(f"fusion: the batch has {positions[0].numel()} {modality} placeholder positions but the "
                             f"{modality} encoder produced {num_features} features; the data's and the model's "
                             f"{modality} settings disagree")
        if num_features:
            embeds = embeds.index_put(positions, features[modality].to(embeds.dtype))
    return embeds


def build_model(cfg: OmniConfig, *, vocab_size: int, load_weights: bool = True) -> OmniModel:
    """The model of a recipe for a tokenizer of `vocab_size` ids, with the pretrained weights the recipe names.

    `model.backbone.vocab_size: 0` takes the tokenizer's size; a pretrained backbone whose
    embedding table is smaller than the tokenizer (special tokens were added) is grown, the new
    rows initialized like fresh embeddings. Pretrained encoders replace the random ones; the
    projectors stay random.
    """
    import dataclasses

    if cfg.pretrained:
        from omni_train.model.qwen2_5_omni import load_thinker

        if vocab_size > cfg.backbone.vocab_size:
            raise ValueError(f"model.pretrained: the tokenizer has {vocab_size} ids but the thinker's vocabulary "
                             f"{cfg.backbone.vocab_size}: use the checkpoint's own tokenizer (data.tokenizer)")
        model = OmniModel(cfg)
        if load_weights:  # False: the caller streams them in (train.zero3.load_state_partitioned)
            load_thinker(model, cfg.pretrained)
        return model
    if cfg.pretrained_backbone:
        from omni_train.model.hf_adapters import load_qwen_backbone

        backbone, backbone_cfg = load_qwen_backbone(cfg.pretrained_backbone, activation_checkpointing=cfg.activation_checkpointing)
        model = OmniModel(dataclasses.replace(cfg, backbone=dataclasses.replace(backbone_cfg, vocab_size=1)))
        model.backbone = backbone
        model.cfg = dataclasses.replace(cfg, backbone=backbone_cfg)
        if vocab_size > backbone_cfg.vocab_size:
            grow_vocab(backbone, vocab_size)
            model.cfg.backbone.vocab_size = vocab_size
        # the transfer head was sized for the placeholder vocabulary above: rebuild it for the real one
        model.transfer = build_transfer(cfg.transfer, dim=backbone_cfg.dim, vocab_size=model.cfg.backbone.vocab_size,
                                        init_std=backbone_cfg.init_std)
    else:
        backbone_cfg = cfg.backbone
        if backbone_cfg.vocab_size == 0:
            backbone_cfg = dataclasses.replace(backbone_cfg, vocab_size=vocab_size)
        elif backbone_cfg.vocab_size < vocab_size:
            raise ValueError(f"model.backbone.vocab_size={backbone_cfg.vocab_size} is smaller than the tokenizer's "
                             f"{vocab_size} ids; set it to 0 to follow the tokenizer")
        model = OmniModel(dataclasses.replace(cfg, backbone=backbone_cfg))
    load_pretrained_encoders(model)
    return model


def load_pretrained_encoders(model: OmniModel) -> None:
    """Replace the encoders named by model.pretrained_audio / pretrained_vision with their checkpoints, in the model's dtype."""
    from omni_train.model.hf_adapters import load_siglip_vision, load_whisper_encoder

    cfg = model.cfg
    if cfg.pretrained_audio:
        model.audio_encoder, _ = load_whisper_encoder(
            cfg.pretrained_audio, downsample=cfg.audio.downsample, dtype=model.audio_encoder.layer_norm.weight.dtype,
            activation_checkpointing=cfg.activation_checkpointing)
    if cfg.pretrained_vision:
        model.vision_encoder, _ = load_siglip_vision(
            cfg.pretrained_vision, temporal_patch_size=cfg.vision.temporal_patch_size, merge_size=cfg.vision.merge_size,
            dtype=model.vision_encoder.patch_embedding.weight.dtype, activation_checkpointing=cfg.activation_checkpointing)


@torch.no_grad()
def grow_vocab(backbone: Backbone, vocab_size: int) -> None:
    """Append embedding (and untied output) rows for ids the checkpoint did not have."""
    old = backbone.embed_tokens.weight
    std = backbone.cfg.init_std
    new = nn.Embedding(vocab_size, old.shape[1], dtype=old.dtype, device=old.device)
    new.weight.normal_(0.0, std)
    new.weight[: old.shape[0]] = old
    backbone.embed_tokens = new
    if backbone.lm_head is not None:
        head = nn.Linear(old.shape[1], vocab_size, bias=False, dtype=old.dtype, device=old.device)
        head.weight.normal_(0.0, std)
        head.weight[: backbone.lm_head.weight.shape[0]] = backbone.lm_head.weight
        backbone.lm_head = head
    backbone.cfg.vocab_size = vocab_size
