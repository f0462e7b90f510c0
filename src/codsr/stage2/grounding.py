"""Grounded-SAM2 masks of nouns through ``transformers`` (paper §3.3; docs/method.md#stage-2).

Per noun: Grounding DINO (``IDEA-Research/grounding-dino-tiny``) with the text prompt
``noun.lower() + "."``, box threshold 0.4 and text threshold 0.3; the two highest-scoring boxes
prompt SAM 2.1 (``facebook/sam2.1-hiera-large``) for one mask each (``multimask_output=False``,
logits > 0); the mask is the union of those masks, at the image's size. The SAM image embedding
is computed once per image.

Every noun gets a :class:`NounMask` whose ``status`` says what happened: ``"ok"``, ``"no_box"``
(nothing above the thresholds), ``"empty_mask"`` (SAM returned no positive pixel),
``"detector_error"`` / ``"sam_error"`` (an exception, message kept). The release turns all of
these silently into empty masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM2 = "facebook/sam2.1-hiera-large"
MASK_STATUSES = ("ok", "no_box", "empty_mask", "detector_error", "sam_error")

__all__ = [
    "DEFAULT_GROUNDING_DINO",
    "DEFAULT_SAM2",
    "MASK_STATUSES",
    "GroundingModelNotFoundError",
    "NounMask",
    "GroundedSAM2",
    "grounding_prompt",
]


class GroundingModelNotFoundError(FileNotFoundError):
    """Grounding DINO or SAM 2 weights could not be loaded."""


def grounding_prompt(noun: str) -> str:
    """The detector's text prompt for a noun: lower case, one trailing period."""
    return noun.strip().lower().rstrip(".") + "."


@dataclass
class NounMask:
    """Segmentation result of one noun; ``mask`` is a bool H×W array when ``status == "ok"``."""

    noun: str
    status: str
    mask: np.ndarray | None = None
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def pixels(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())


def _load(loader, ref: str, what: str, **kw):
    try:
        return loader.from_pretrained(ref, **kw)
    except (OSError, ValueError) as err:
        raise GroundingModelNotFoundError(
            f"{what} could not be loaded from {ref!r} ({err}). Pass a local folder in transformers format "
            f"(config.json + model.safetensors + processor files), e.g. download it with "
            f"`huggingface-cli download {DEFAULT_GROUNDING_DINO if 'DINO' in what else DEFAULT_SAM2} --local-dir DIR` "
            "where the network allows."
        ) from err


class GroundedSAM2:
    """Grounding DINO + SAM 2 segmenter of nouns (see the module docstring).

    Build with :meth:`from_pretrained` or from already constructed models and processors
    (tests use tiny random ones).
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        detector_processor,
        sam: torch.nn.Module,
        sam_processor,
        box_threshold: float = 0.4,
        text_threshold: float = 0.3,
        max_boxes: int = 2,
    ) -> None:
        self.detector = detector.eval().requires_grad_(False)
        self.detector_processor = detector_processor
        self.sam = sam.eval().requires_grad_(False)
        self.sam_processor = sam_processor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.max_boxes = int(max_boxes)

    @classmethod
    def from_pretrained(
        cls,
        grounding_dino: str | os.PathLike = DEFAULT_GROUNDING_DINO,
        sam2: str | os.PathLike = DEFAULT_SAM2,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        **kwargs,
    ) -> GroundedSAM2:
        """Load both models (transformers format) from Hub ids or local folders onto ``device``."""
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, Sam2Model, Sam2Processor

        kw = {"cache_dir": cache_dir} if cache_dir else {}
        gd_ref, sam_ref = str(grounding_dino), str(sam2)
        detector = _load(AutoModelForZeroShotObjectDetection, gd_ref, "Grounding DINO", **kw)
        detector_processor = _load(AutoProcessor, gd_ref, "Grounding DINO processor", **kw)
        sam = _load(Sam2Model, sam_ref, "SAM 2", **kw)
        sam_processor = _load(Sam2Processor, sam_ref, "SAM 2 processor", **kw)
        return cls(detector.to(device), detector_processor, sam.to(device), sam_processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def detect(self, image, noun: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``max_boxes`` boxes (x0, y0, x1, y1 in pixels) and scores of ``noun`` in ``image``."""
        width, height = image.size
        inputs = self.detector_processor(images=image, text=grounding_prompt(noun), return_tensors="pt")
        inputs = inputs.to(self.device)
        outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)],
        )[0]
        boxes, scores = result["boxes"].float().cpu(), result["scores"].float().cpu()
        if boxes.numel() == 0:
            return boxes.reshape(0, 4), scores.reshape(0)
        top = torch.topk(scores, k=min(self.max_boxes, scores.numel())).indices
        return boxes[top], scores[top]

    @torch.inference_mode()
    def image_embeddings(self, image) -> list[torch.Tensor]:
        """SAM 2 image embeddings of ``image`` (computed once, reused for every noun)."""
        pixel_values = self.sam_processor(images=image, return_tensors="pt")["pixel_values"]
        return self.sam.get_image_embeddings(pixel_values.to(self.device))

    @torch.inference_mode()
    def segment_boxes(
        self, embeddings: list[torch.Tensor], size: tuple[int, int], boxes: torch.Tensor
    ) -> np.ndarray:
        """Union of SAM's single masks for ``boxes`` (pixels, x0 y0 x1 y1) as a bool (H, W) array."""
        height, width = size
        prompts = self.sam_processor(
            original_sizes=[[height, width]], input_boxes=[boxes.tolist()], return_tensors="pt"
        )
        outputs = self.sam(
            input_boxes=prompts["input_boxes"].to(self.device),
            image_embeddings=embeddings,
            multimask_output=False,
        )
        masks = self.sam_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), prompts["original_sizes"], mask_threshold=0.0, binarize=True
        )[0]  # boxes × 1 × H × W, bool
        return (masks.float() > 0.5).any(dim=0)[0].numpy()

    # ------------------------------------------------------------------ API
    def segment(self, image, nouns: Sequence[str]) -> list[NounMask]:
        """One :class:`NounMask` per noun of ``nouns`` (PIL RGB image; duplicates share a result)."""
        size = (image.size[1], image.size[0])
        embeddings = None
        done: dict[str, NounMask] = {}
        results: list[NounMask] = []
        for noun in nouns:
            key = noun.strip().lower()
            if key in done:
                prev = done[key]
                results.append(NounMask(noun, prev.status, prev.mask, prev.boxes, prev.scores, prev.error))
                continue
            try:
                boxes, scores = self.detect(image, noun)
            except Exception as err:  # a failure is reported per noun, the others go on
                res = NounMask(noun, "detector_error", error=f"{type(err).__name__}: {err}")
            else:
                if boxes.shape[0] == 0:
                    res = NounMask(noun, "no_box")
                else:
                    box_list = [[round(float(v), 2) for v in b] for b in boxes]
                    score_list = [round(float(s), 4) for s in scores]
                    try:
                        if embeddings is None:
                            embeddings = self.image_embeddings(image)
                        mask = self.segment_boxes(embeddings, size, boxes)
                    except Exception as err:
                        res = NounMask(noun, "sam_error", boxes=box_list, scores=score_list,
                                       error=f"{type(err).__name__}: {err}")  # fmt: skip
                    else:
                        status = "ok" if mask.any() else "empty_mask"
                        res = NounMask(noun, status, mask if mask.any() else None, box_list, score_list)
            done[key] = res
            results.append(res)
        return results
