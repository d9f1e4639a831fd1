"""Representation diagnostics in metrics.jsonl: where the gradient goes, which task carries the loss,
whether the model uses each modality, and whether speech and text meet (issue 13, point 5).

    train:
      diagnostics: {grad_norms: true, loss_share: true, reliance_every: 100,
                    reliance_min: 0.02, collapse_min_loss: 0.5, collapse_patience: 3}
    probes:   # cross-modal alignment: the retrieval probe, with linear CKA at chosen backbone layers
      - {name: align, kind: retrieval, shards: "shards/demo/probe-*.tar", tasks: [asr], every: 100, layers: [1, 3]}

Metrics (keys of metrics.jsonl rows):
- `grad_norm/<module>` (`grad_norms`, on the steps the loop logs every `train.log_every`, the first and
  the last): the L2 norm of the gradient of every trainable parameter of one top-level module of the model
  (audio_encoder, audio_projector, vision_encoder, vision_projector, backbone, transfer, and any fusion
  module a fusion adds as a child), before clipping, over the whole optimizer step (all micro-batches,
  all ranks: the gradient the optimizer sees). The modules' squares sum to `grad_norm`'s square.
  Single and DDP read `param.grad`; DeepSpeed ZeRO 1-3 assembles each parameter's full gradient with
  `deepspeed.utils.safe_get_full_grad` (one collective per parameter, the same on every rank).
- `grad_norm/features/<modality>` (`grad_norms`): the norm of the gradient of the training loss with
  respect to the projected features of that modality (the projector's output, whatever fusion then
  consumes it), over all of the step's micro-batches and ranks, as the gradient of the global loss
  (the mean over ranks): sqrt(sum over ranks of |g_r|^2) / world_size. A tensor hook on the projector
  output records it; image and video features share the vision projector and are split by the batch's
  `image_num_tokens` (images come first, as `OmniModel._encode` runs them).
- `loss_share/<task>` and `task_loss/<task>` (`loss_share`): per `meta.task` of the training samples,
  its summed token loss over the summed token loss of all tasks, and its mean loss per target token,
  accumulated over every step since the previous logged row and over all ranks. A sample's tokens are
  its document's positions (`document_ids` numbers the batch's samples in order, `data/packing.py`).
- `reliance/<modality>` and `modality_loss/<modality>` (every `reliance_every` steps, on the first
  `train.eval_batches` batches of `data.eval`): `modality_loss` is the mean token loss of the eval
  documents that contain the modality; `reliance` is how much that loss rises when every projected
  feature of the modality is replaced by one vector, the mean of that modality's features over all of
  these eval batches on all ranks (the data set mean, so no item keeps anything of its own; the
  number of positions stays). Near 0: the model ignores the modality. Other documents cannot change
  (attention stays within a document), so they are left out of both numbers.
- `collapse/<modality>` (with reliance): 1 when reliance has stayed below `reliance_min` for
  `collapse_patience` consecutive checks while `modality_loss` is above `collapse_min_loss` (the
  modality is ignored although its samples are not yet learnt), else 0. On a 1 the run's log gets a
  `collapse alarm` line. The count of consecutive checks restarts with the process (not checkpointed).
- alignment: the retrieval probe (`probes/runner.py`) gives speech -> text recall@k over training; with
  `layers: [i, ...]` it adds `cka/layer<i>`, the linear CKA between the pooled speech states and the
  pooled transcript states at the output of backbone layer i (in probes.jsonl; in metrics.jsonl as
  `probe/<name>/cka/layer<i>`). Linear CKA (Kornblith et al. 2019, arXiv:1905.00414) of centred
  X (n, d1), Y (n, d2) is ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F): 1 for representations equal up to
  rotation and scale. With few items (n well below d) it reads high even for unrelated features:
  compare values over training and between runs with the same items, not with 0.

Cost per step: grad norms and loss shares add no forward or backward (on logged steps, per-parameter
norms, and under ZeRO one full-gradient collective per parameter: about one extra gradient reduction);
reliance costs (1 + the modalities in the eval set) eval forwards per eval batch every `reliance_every`
steps. Distributed rule (ZeRO-3 gathers parameters in every forward): every rank runs the same number
of forwards and the same collectives; which modalities are ablated is decided from all-reduced counts.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from omni_train.data.packing import IGNORE_INDEX
from omni_train.data.sample import MODALITY_IDS
from omni_train.train.engine import all_reduce

MODALITY_PROJECTORS = {"audio": "audio_projector", "image": "vision_projector", "video": "vision_projector"}


@dataclass(kw_only=True)
class DiagnosticsConfig:
    grad_norms: bool = False          # grad_norm/<module> and grad_norm/features/<modality> on logged steps
    loss_share: bool = False          # loss_share/<task> and task_loss/<task> on logged steps
    reliance_every: int = 0           # reliance/<modality> every N steps on data.eval batches; 0: never
    reliance_min: float = 0.02        # collapse: reliance below this (nats per token) ...
    collapse_min_loss: float = 0.5    # ... while the modality's documents' loss is above this ...
    collapse_patience: int = 3        # ... for this many consecutive reliance checks

    def __post_init__(self):
        if self.reliance_every < 0:
            raise ValueError(f"diagnostics.reliance_every must be >= 0 (0: never), got {self.reliance_every}")
        if self.collapse_patience < 1:
            raise ValueError(f"diagnostics.collapse_patience must be >= 1, got {self.collapse_patience}")
        if not self.reliance_min >= 0 or not self.collapse_min_loss >= 0:
            raise ValueError(f"diagnostics.reliance_min and diagnostics.collapse_min_loss must be >= 0, got "
                             f"{self.reliance_min} and {self.collapse_min_loss}")


# ------------------------------------------------------------------------------------------ gradients


def module_grad_norms(model: nn.Module, *, deepspeed: bool) -> dict[str, float]:
    """{top-level module: L2 norm of its trainable parameters' gradients}, modules without any left out.

    Call after the step's last backward and before the optimizer step. Under DeepSpeed every rank must
    call it (each parameter's full gradient is assembled collectively, in the same order everywhere).
    """
    if deepspeed:
        from deepspeed.utils import safe_get_full_grad
    norms = {}
    for name, child in model.named_children():
        sumsq, trainable = torch.zeros((), dtype=torch.float64), False
        for p in child.parameters():
            if not p.requires_grad:
                continue
            trainable = True
            grad = safe_get_full_grad(p) if deepspeed else p.grad
            if grad is not None:
                sumsq += grad.detach().double().pow(2).sum().cpu()
        if trainable:
            norms[name] = float(sumsq.sqrt())
    return norms


def modality_rows(projector: str, module: nn.Module, batch: dict[str, Any], num_rows: int) -> list[tuple[str, int, int]]:
    """[(modality, first row, end row)] of a projector output (num_rows, D) for `batch`; [] when the
    projector ran on its dummy input (the batch has none of its modalities: omni.py's distributed rule).
    Images come first (OmniModel._encode); a projector that groups tokens (pool) says how many rows each
    modality's items give (`num_outputs`)."""
    if projector == "audio_projector":
        return [("audio", 0, num_rows)] if "audio_mel" in batch else []
    present = [m for m in ("image", "video") if f"{m}_patches" in batch]
    outputs = getattr(module, "num_outputs", lambda counts: counts)
    counts = [sum(outputs(batch[f"{m}_num_tokens"].tolist())) for m in present]
    if len(present) == 2 and sum(counts) != num_rows:
        raise ValueError(f"diagnostics: the vision projector gave {num_rows} features for {counts[0]} image and "
                         f"{counts[1]} video tokens; cannot tell images from videos")
    spans, start = [], 0
    for modality, count in zip(present, counts if len(present) == 2 else [num_rows]):
        spans.append((modality, start, start + count))
        start += count
    return spans


@contextlib.contextmanager
def projector_hooks(model: nn.Module, hook) -> Iterator[None]:
    """Forward hooks `hook(projector_name, projector, output) -> output or None` on the model's projectors, for the block."""
    handles = []
    for name in dict.fromkeys(MODALITY_PROJECTORS.values()):
        module = getattr(model, name, None)
        if module is not None:
            handles.append(module.register_forward_hook(lambda m, _args, out, name=name: hook(name, m, out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FeatureGradients:
    """Squared norms of the loss gradient reaching each modality's projected features, summed over the
    micro-batches run inside `with self.recording(batch):` (a tensor hook on each projector output)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sumsq: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, batch: dict[str, Any]) -> Iterator[None]:
        def hook(projector: str, module: nn.Module, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return
            spans = modality_rows(projector, module, batch, out.shape[0])
            out.register_hook(lambda grad: self._add(grad, spans))

        with projector_hooks(self.model, hook):
            yield

    def _add(self, grad: torch.Tensor, spans: list[tuple[str, int, int]]) -> None:
        for modality, start, end in spans:
            value = grad[start:end].detach().double().pow(2).sum()
            self.sumsq[modality] = self.sumsq.get(modality, 0.0) + value

    def norms(self, dist) -> dict[str, float]:
        """{modality: norm} over all ranks, as the gradient of the mean of the ranks' losses. Collective."""
        names = [m for m in MODALITY_PROJECTORS if getattr(self.model, MODALITY_PROJECTORS[m], None) is not None]
        local = [float(self.sumsq.get(m, 0.0)) for m in names]
        total = all_reduce(local, dist)
        return {m: (value ** 0.5) / dist.world_size for m, value in zip(names, total)}


# ------------------------------------------------------------------------------------ losses per document


@contextlib.contextmanager
def backbone_documents(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the document_ids each backbone call receives (after fusion and any transfer mechanism, the
    layout of `OmniOutput.per_token_loss`)."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        if kwargs.get("document_ids") is not None:
            seen.append(kwargs["document_ids"])

    handle = model.backbone.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def document_losses(per_token_loss: torch.Tensor, fused_documents: torch.Tensor,
                    batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, number of loss targets) per document of `batch`, each (num documents,) float64.

    Sums come from `per_token_loss` over the fused document ids (a fusion may move or shorten media spans
    but keeps the documents' numbers); counts from the batch's own labels, which fusion leaves as they
    are: target t counts when labels[t] is set and t - 1 is in the same document (`next_token_loss`).
    """
    num_documents = len(batch["samples"])
    docs = fused_documents.reshape(-1).to(per_token_loss.device)
    real = docs >= 0
    sums = torch.zeros(num_documents, dtype=torch.float64, device=per_token_loss.device)
    sums.index_add_(0, docs[real], per_token_loss.reshape(-1)[real].double())
    documents, labels = batch["document_ids"], batch["labels"]
    target = (labels[:, 1:] != IGNORE_INDEX) & (documents[:, 1:] == documents[:, :-1]) & (documents[:, :-1] >= 0)
    counts = torch.bincount(documents[:, 1:][target].reshape(-1).cpu(), minlength=num_documents).double()
    return sums.cpu(), counts


def task_losses(per_token_loss: torch.Tensor, fused_documents: torch.Tensor, batch: dict[str, Any]) -> dict[str, list[float]]:
    """{task: [summed token loss, number of targets]} of one micro-batch (task None: "unknown")."""
    sums, counts = document_losses(per_token_loss, fused_documents, batch)
    out: dict[str, list[float]] = {}
    for sample, loss_sum, count in zip(batch["samples"], sums.tolist(), counts.tolist()):
        entry = out.setdefault(str(sample.get("task") or "unknown"), [0.0, 0.0])
        entry[0] += loss_sum
        entry[1] += count
    return out


def reduce_named(values: dict[str, list[float]], dist, width: int) -> dict[str, list[float]]:
    """Sum `{name: [width floats]}` over ranks whose dicts may name different keys. Collective."""
    names = set(values)
    if dist.backend is not None and dist.world_size > 1:
        gathered: list = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, sorted(names))
        names = {n for part in gathered for n in part}
    names = sorted(names)
    flat = all_reduce([v for n in names for v in values.get(n, [0.0] * width)], dist)
    return {n: flat[i * width:(i + 1) * width] for i, n in enumerate(names)}


def loss_share_metrics(task_sums: dict[str, list[float]], dist) -> dict[str, float]:
    """loss_share/<task> and task_loss/<task> from every rank's {task: [loss sum, targets]}. Collective."""
    reduced = reduce_named(task_sums, dist, width=2)
    total = sum(s for s, _ in reduced.values())
    row = {}
    for task, (loss_sum, count) in reduced.items():
        row[f"loss_share/{task}"] = loss_sum / total if total > 0 else 0.0
        row[f"task_loss/{task}"] = loss_sum / count if count else 0.0
    return row


# ---------------------------------------------------------------------------------------------- reliance


def model_modalities(model: nn.Module) -> list[str]:
    return [m for m, name in MODALITY_PROJECTORS.items() if getattr(model, name, None) is not None]


def _documents_with(batch: dict[str, Any], modality: str) -> torch.Tensor:
    """(num documents,) bool: the documents holding a placeholder of `modality`."""
    mask = torch.zeros(len(batch["samples"]), dtype=torch.bool)
    docs = batch["document_ids"][batch["modality_ids"] == MODALITY_IDS[modality]]
    mask[docs[docs >= 0].unique().cpu()] = True
    return mask


@torch.no_grad()
def measure_reliance(engine, batches: list[dict[str, Any]], dist) -> dict[str, float]:
    """reliance/<m> and modality_loss/<m> over `batches` (this rank's share of the eval batches; every
    rank passes the same number). Collective: 1 + (modalities present on any rank) forwards per batch."""
    model = engine.module
    modalities = model_modalities(model)
    if not batches or not modalities:
        return {}
    dim: dict[str, int] = {}
    feature_sum: dict[str, torch.Tensor] = {}
    feature_count: dict[str, int] = defaultdict(int)
    current: dict[str, Any] = {}

    def collect(projector: str, module: nn.Module, out: torch.Tensor) -> None:
        for modality, start, end in modality_rows(projector, module, current, out.shape[0]):
            feats = out[start:end].detach().double()
            feature_sum[modality] = feature_sum.get(modality, 0.0) + feats.sum(dim=0).cpu()
            feature_count[modality] += end - start

    def document_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with backbone_documents(model) as seen:
            out = engine.eval_output(batch)
        fused = seen[-1] if seen else batch["document_ids"]
        return document_losses(out.per_token_loss, fused, batch)

    normal = {m: [0.0, 0.0] for m in modalities}  # summed loss, targets of the documents holding m
    per_batch = []
    with projector_hooks(model, collect):
        for batch in batches:
            current.clear()
            current.update(batch)
            sums, counts = document_loss(batch)
            masks = {m: _documents_with(batch, m) for m in modalities}
            per_batch.append(masks)
            for m in modalities:
                normal[m][0] += float(sums[masks[m]].sum())
                normal[m][1] += float(counts[masks[m]].sum())
    for m in modalities:
        dim[m] = feature_sum[m].numel() if m in feature_sum else 0
    (width,) = all_reduce([max(dim.values())], dist, op="max")  # the feature dim, also where a rank saw no media
    width = int(width)
    flat = []
    for m in modalities:
        vector = feature_sum[m] if m in feature_sum else torch.zeros(width, dtype=torch.float64)
        flat += [*normal[m], float(feature_count[m]), *vector.tolist()]
    flat = all_reduce(flat, dist)
    row: dict[str, float] = {}
    stride = 3 + width
    for i, m in enumerate(modalities):
        loss_sum, targets, count = flat[i * stride:i * stride + 3]
        if count == 0 or targets == 0:  # absent from the eval set on every rank: no forward for it anywhere
            continue
        mean = torch.tensor(flat[i * stride + 3:(i + 1) * stride], dtype=torch.float64) / count

        def replace(projector: str, module: nn.Module, out: torch.Tensor, m=m, mean=mean) -> torch.Tensor | None:
            spans = [(s, e) for modality, s, e in modality_rows(projector, module, current, out.shape[0]) if modality == m]
            if not spans:
                return None
            out = out.clone()
            for start, end in spans:
                out[start:end] = mean.to(device=out.device, dtype=out.dtype)
            return out

        ablated = [0.0]
        with projector_hooks(model, replace):
            for batch, masks in zip(batches, per_batch):
                current.clear()
                current.update(batch)
                sums, _ = document_loss(batch)
                ablated[0] += float(sums[masks[m]].sum())
        (ablated_sum,) = all_reduce(ablated, dist)
        row[f"modality_loss/{m}"] = loss_sum / targets
        row[f"reliance/{m}"] = (ablated_sum - loss_sum) / targets
    return row


class CollapseWatch:
    """Counts consecutive reliance checks at which a modality looks ignored while its documents' loss is high."""

    def __init__(self, cfg: DiagnosticsConfig):
        self.cfg = cfg
        self.low: dict[str, int] = defaultdict(int)

    def update(self, step: int, row: dict[str, float]) -> tuple[dict[str, int], list[str]]:
        """({collapse/<m>: 0 or 1}, alarm lines) for the reliance metrics of `row`."""
        cfg, flags, lines = self.cfg, {}, []
        for key in sorted(k for k in row if k.startswith("reliance/")):
            m = key.removeprefix("reliance/")
            reliance, loss = row[key], row[f"modality_loss/{m}"]
            self.low[m] = self.low[m] + 1 if reliance < cfg.reliance_min and loss > cfg.collapse_min_loss else 0
            flags[f"collapse/{m}"] = int(self.low[m] >= cfg.collapse_patience)
            if flags[f"collapse/{m}"]:
                lines.append(f"step {step}: collapse alarm: the model ignores {m}: reliance/{m} {reliance:.4f} < "
                             f"{cfg.reliance_min} for {self.low[m]} checks while modality_loss/{m} {loss:.4f} > "
                             f"{cfg.collapse_min_loss}")
        return flags, lines


# --------------------------------------------------------------------------------------------- alignment


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x (n, d1) and y (n, d2), rows paired: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) after
    centring each feature; 0 when a side is constant over the rows (it shares no structure: e.g. the speech
    states before the first cross_attn block, where a prompt's audio is one anchor position); nan for < 2 rows."""
    assert x.shape[0] == y.shape[0], (x.shape, y.shape)
    if x.shape[0] < 2:
        return float("nan")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denominator == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denominator)


@contextlib.contextmanager
def backbone_with_layers(model: nn.Module, layers: list[int]) -> Iterator[None]:
    """For the block, the backbone returns (B, L, D * (1 + len(layers))): its final hidden states, then the
    outputs of `layers` (the residual stream after each), concatenated on the last dimension, so code that
    pools the backbone's output per position (probes.generate.mean_hidden) pools each of them with the same
    positions in one forward. The output of layer i is `out[..., (1 + j) * D:(2 + j) * D]` for layers[j]."""
    if not layers:
        yield
        return
    num_layers = len(model.backbone.layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers: the backbone has layers 0..{num_layers - 1}, got {bad[0]}")
    captured: dict[int, torch.Tensor] = {}
    handles = [model.backbone.layers[i].register_forward_hook(
        lambda _m, _args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in layers]
    handles.append(model.backbone.register_forward_hook(
        lambda _m, _args, out: torch.cat([out, *(captured[i].to(out.dtype) for i in layers)], dim=-1)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
