"""COCO box evaluation (pycocotools' COCOeval), distributed-aware, and the evaluation loop.

:class:`CocoEvaluator` collects detections per image, merges them across ``torch.distributed`` ranks and
returns the 12 standard metrics as a dict. pycocotools prints its progress and table on stdout; that output is
captured (logged at DEBUG level) and the evaluator logs one table of its own only when asked. A metric is -1
where COCOeval leaves it undefined (no ground truth in that area range), as pycocotools reports it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from deco.distributed import is_distributed, is_main_process
from deco.models import build_deco, postprocess

__all__ = [
    "METRIC_NAMES",
    "CocoEvaluator",
    "build_model_from_checkpoint",
    "evaluate",
    "format_metrics",
    "load_model_checkpoint",
]

logger = logging.getLogger(__name__)

MAX_DETECTIONS = 100  # per image, COCOeval's largest maxDets

# In the order of COCOeval.stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_METRIC_DESCRIPTIONS = (
    "IoU 0.50:0.95, all areas, 100 dets",
    "IoU 0.50, all areas, 100 dets",
    "IoU 0.75, all areas, 100 dets",
    "IoU 0.50:0.95, small, 100 dets",
    "IoU 0.50:0.95, medium, 100 dets",
    "IoU 0.50:0.95, large, 100 dets",
    "IoU 0.50:0.95, all areas, 1 det",
    "IoU 0.50:0.95, all areas, 10 dets",
    "IoU 0.50:0.95, all areas, 100 dets",
    "IoU 0.50:0.95, small, 100 dets",
    "IoU 0.50:0.95, medium, 100 dets",
    "IoU 0.50:0.95, large, 100 dets",
)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The 12 metrics as an aligned text table, one per line."""
    lines = [f"{'metric':<6}  {'value':>7}  setting"]
    for name, description in zip(METRIC_NAMES, _METRIC_DESCRIPTIONS):
        lines.append(f"{name:<6}  {metrics[name]:>7.4f}  {description}")
    return "\n".join(lines)


class CocoEvaluator:
    """Accumulates detections and scores them against ``coco_gt`` with COCOeval (box IoU).

    ``categories``: list of {"id", "name"} in the model's label order: label ``i`` is scored as COCO category
    ``categories[i]["id"]``.
    """

    def __init__(self, coco_gt: COCO, categories: list[dict]):
        if not categories:
            raise ValueError("categories must hold at least one {'id', 'name'} entry")
        self.coco_gt = coco_gt
        self.categories = [{"id": int(c["id"]), "name": c["name"]} for c in categories]
        self.label_to_category_id = [c["id"] for c in self.categories]
        unknown = sorted(set(self.label_to_category_id) - set(coco_gt.getCatIds()))
        if len(unknown) == len(self.categories):
            raise ValueError(
                f"none of the category ids {self.label_to_category_id} is among the ground truth's "
                f"{sorted(coco_gt.getCatIds())}: the model's categories do not belong to this dataset"
            )
        if unknown:
            logger.warning("category ids %s are not in the ground truth; their detections cannot match", unknown)
        # image id -> list of COCO result dicts (without "id", assigned when scoring)
        self._detections: dict[int, list[dict]] = {}

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images evaluated so far, ascending."""
        return sorted(self._detections)

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of some images.

        ``predictions``: image_id -> {"scores": N, "labels": N int (model labels), "boxes": N x 4 xyxy in
        pixels of the original image}. An image with no detection still counts as evaluated (pass N = 0).
        An image already added keeps its first detections (a distributed sampler repeats images to pad).
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image_id {image_id} is not in the ground truth")
            if image_id in self._detections:
                continue
            scores = prediction["scores"].detach().float().cpu().reshape(-1)
            labels = prediction["labels"].detach().cpu().reshape(-1)
            boxes = prediction["boxes"].detach().float().cpu()
            if boxes.shape != (scores.numel(), 4) or labels.numel() != scores.numel():
                raise ValueError(
                    f"image_id {image_id}: expected scores N, labels N and boxes N x 4; got scores "
                    f"{tuple(prediction['scores'].shape)}, labels {tuple(prediction['labels'].shape)}, boxes "
                    f"{tuple(prediction['boxes'].shape)}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.categories)):
                raise ValueError(
                    f"image_id {image_id}: labels must lie in [0, {len(self.categories)}); got "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1)
            self._detections[image_id] = [
                {
                    "image_id": image_id,
                    "category_id": self.label_to_category_id[label],
                    "bbox": box,
                    "score": score,
                }
                for label, box, score in zip(labels.tolist(), xywh.tolist(), scores.tolist())
            ]

    def synchronize(self) -> None:
        """Gather every rank's detections on every rank (a no-op without an initialised process group); an
        image evaluated on several ranks is kept once."""
        if not is_distributed():
            return
        gathered: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._detections)
        merged: dict[int, list[dict]] = {}
        for part in gathered:
            for image_id, detections in part.items():
                merged.setdefault(image_id, detections)
        self._detections = merged

    def _detections_as_coco(self) -> COCO:
        annotations = []
        for image_id in self.image_ids:
            for detection in self._detections[image_id]:
                width, height = detection["bbox"][2:]
                annotations.append(
                    {**detection, "id": len(annotations) + 1, "area": width * height, "iscrowd": 0}
                )
        coco_dt = COCO()
        # Built directly instead of with COCO.loadRes, which cannot take an empty result list.
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": list(self.coco_gt.dataset["categories"]),
            "annotations": annotations,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
        return coco_dt

    def summarize(self, log_table: bool = False) -> dict[str, float]:
        """Run COCOeval over the images evaluated so far; returns {name: value} for :data:`METRIC_NAMES`.

        With ``log_table`` the table is logged at INFO level. Raises RuntimeError before any :meth:`update`.
        """
        if not self._detections:
            raise RuntimeError("no image has been evaluated: call update() before summarize()")
        coco_eval = COCOeval(self.coco_gt, self._detections_as_coco(), iouType="bbox")
        coco_eval.params.imgIds = self.image_ids
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.debug("pycocotools output:\n%s", captured.getvalue())
        metrics = {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}
        if log_table:
            logger.info("COCO box metrics over %d images:\n%s", len(self._detections), format_metrics(metrics))
        return metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_loader: Iterable,
    evaluator: CocoEvaluator,
    device: torch.device | str,
    *,
    progress: bool = True,
    log_table: bool = True,
) -> dict[str, float]:
    """Run ``model`` over ``data_loader`` (batches from :func:`deco.data.collate_fn`) and score it.

    Each batch is ``model(images, mask)``, then :func:`deco.models.postprocess` (the top 100 detections per
    image, COCO's limit, or queries x classes when fewer) into detections for ``evaluator``. Under torch.distributed
    every rank evaluates its shard, detections are merged, rank 0 scores them (logging the table when
    ``log_table``) and the metrics are broadcast, so every rank returns the same dict. ``progress``: a tqdm
    bar on rank 0. The model's train/eval mode is restored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for images, mask, targets in tqdm(
            data_loader, desc="evaluating", unit="batch", disable=not (progress and is_main_process())
        ):
            outputs = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            orig_sizes = torch.stack([target["orig_size"] for target in targets]).to(device)
            top_k = min(MAX_DETECTIONS, outputs["pred_logits"][0].numel())
            results = postprocess(outputs, orig_sizes, top_k=top_k)
            evaluator.update({target["image_id"]: result for target, result in zip(targets, results)})
    finally:
        model.train(was_training)
    evaluator.synchronize()
    metrics = evaluator.summarize(log_table=log_table) if is_main_process() else None
    if is_distributed():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def load_model_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint for inference: a dict with at least "model" (state_dict), "model_config"
    (``build_deco`` keyword arguments) and "categories" (list of {"id", "name"}); training state is not
    needed. Raises FileNotFoundError / ValueError naming ``path`` and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: training checkpoints also hold NumPy and Python RNG states.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types (pickle, zip, EOF, runtime) on a bad file
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    missing = [key for key in ("model", "model_config", "categories") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; `deco train` and `deco convert` write these keys")
    return checkpoint


def build_model_from_checkpoint(
    checkpoint: dict, device: torch.device | str = "cpu", channels_last: bool | None = None, **overrides
) -> torch.nn.Module:
    """``build_deco(**checkpoint["model_config"], **overrides)`` with the checkpoint's weights loaded
    (strictly), moved to ``device`` and put in eval mode; channels-last if asked, by default as the checkpoint's
    training run was (its ``config``). The backbone's pretrained-weights file named in the config is not read
    (the checkpoint holds all weights and that file may not exist here)."""
    if channels_last is None:
        channels_last = bool((checkpoint.get("config") or {}).get("channels_last", False))
    model = build_deco(**{**checkpoint["model_config"], "backbone_weights": None, **overrides})
    model.load_state_dict(checkpoint["model"])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
