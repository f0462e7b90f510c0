"""Tiny random Grounding DINO and SAM 2 models (transformers format) for offline mask runs.

:func:`save_tiny_grounding_models` writes them so that ``codsr masks`` (and stage-2 training with
online masks) runs offline in tests and CPU recipes (``codsr make-tiny-model --grounding``). Their
masks are meaningless but deterministic. This is the one tiny Grounding DINO / SAM 2 config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["TINY_GROUNDING_VOCAB", "save_tiny_grounding_models"]


# Word-piece vocabulary of the tiny Grounding DINO's BERT tokenizer: BERT's special tokens, the
# period that ends every detector prompt, and common RAM tags (other words become [UNK]).
TINY_GROUNDING_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".",
    "cat", "dog", "bird", "tree", "sky", "grass", "car", "building", "road", "water", "flower",
    "person", "man", "woman", "house", "cloud", "mountain", "field", "wall", "window", "street",
)  # fmt: skip


def _save_tiny_grounding_dino(folder: Path, image_size: int) -> None:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    # Grounding DINO needs >= 2 decoder layers (tied weights) and an input above 64² (transformers constraint).
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=image_size, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(TINY_GROUNDING_VOCAB), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32,
    )  # fmt: skip
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(TINY_GROUNDING_VOCAB)})
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": image_size}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_tiny_sam2(folder: Path, size: int) -> None:
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    # A global-attention block must not open a Hiera stage (ZeroDivisionError): stage 3 = blocks 2, 3.
    backbone = Sam2HieraDetConfig(
        hidden_size=8, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[2, 2, 2, 2], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )  # fmt: skip
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32,
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
    )  # fmt: skip
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16,
                                                      mask_input_channels=4),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                                  num_attention_heads=2, iou_head_hidden_dim=16),
    )  # fmt: skip
    Sam2Model(config).save_pretrained(folder)
    image_processor = Sam2ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
    )
    Sam2Processor(image_processor=image_processor, target_size=size).save_pretrained(folder)


def save_tiny_grounding_models(
    out_dir: str | os.PathLike, seed: int = 0, detector_size: int = 96, sam_size: int = 128
) -> tuple[Path, Path]:
    """Write tiny random Grounding DINO and SAM 2.1 models (transformers format) for offline runs.

    Returns ``(out_dir/grounding_dino, out_dir/sam2)``, the folders to pass to ``codsr masks
    --grounding-dino/--sam2`` or ``masks.grounding_dino/sam2``. Both are seeded with ``seed``;
    their masks are meaningless but deterministic. The detector works at ``detector_size`` px
    (> 64: Grounding DINO adds a downsampled level), SAM at ``sam_size`` px (a multiple of 16).
    """
    if detector_size <= 64:
        raise ValueError(
            f"detector_size must exceed 64 px (Grounding DINO's extra level), got {detector_size}"
        )
    if sam_size % 16:
        raise ValueError(f"sam_size must be a multiple of 16 (SAM's patch size), got {sam_size}")
    out = Path(out_dir)
    gd, sam = out / "grounding_dino", out / "sam2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_tiny_grounding_dino(gd, detector_size)
        torch.manual_seed(seed)
        _save_tiny_sam2(sam, sam_size)
    return gd, sam
