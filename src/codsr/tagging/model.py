"""RAM (Recognize Anything, Swin-L, 384 px) tagging network, built from timm and transformers parts.

The tagging path of the model CODSR loads for its prompts (docs/method.md#inference for DAPE tags at
inference, #stage-1 and #stage-2 for RAM tags of HQ crops in training):

    tokens  = SwinL(x)                                   [B, 12·12, 1536]  (final LayerNorm applied)
    memory  = image_proj(cat([mean(tokens), tokens]))    [B, 145, 512]     (mean token first)
    queries = relu(wordvec_proj(label_embed))            [4585, 768]       (shared by the batch)
    h       = 2 × post-LN BERT layer, cross-attention only, 4 heads       [B, 4585, 768]
    logits  = fc(h).squeeze(-1)                          [B, 4585]

Submodule names follow the release's state-dict names (``visual_encoder``, ``image_proj``,
``label_embed``, ``wordvec_proj``, ``tagging_head.encoder.layer.i.*``, ``fc``), except the timm
Swin's stage layout, which :mod:`codsr.tagging.convert` maps. Only the tagging path exists here:
the release's ``tag_encoder`` / ``text_decoder`` BERTs (captioning) are not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RAMConfig", "RAMSwinL", "TaggingHead", "build_ram_swin_l"]


@dataclass(frozen=True)
class RAMConfig:
    """Sizes of the RAM Swin-L/384 tagging path (fixture ARCHITECTURE.md §2-§3)."""

    image_size: int = 384
    swin_name: str = "swin_large_patch4_window12_384"
    vision_width: int = 1536
    embed_dim: int = 512  # image_proj output and label_embed width
    num_classes: int = 4585
    hidden_size: int = 768
    num_heads: int = 4  # RAM's q2l config; the BERT default of 12 is wrong here
    num_layers: int = 2
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "sdpa"  # "eager" gives the same values within ~1e-6


class TaggingLayer(nn.Module):
    """One Query2Label layer: cross-attention (no self-attention) then the BERT feed-forward.

    ``BertLayer`` cannot be used because it always runs self-attention first; the parts below have
    the same names as in the release's checkpoint (``crossattention``, ``intermediate``, ``output``).
    """

    def __init__(self, config, encoder_width: int) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

        self.crossattention = BertAttention(config, is_cross_attention=True)
        # Keys/values read the 512-wide image memory, queries stay 768-wide.
        self.crossattention.self.key = nn.Linear(encoder_width, config.hidden_size)
        self.crossattention.self.value = nn.Linear(encoder_width, config.hidden_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(hidden, encoder_hidden_states=memory)[0]
        return self.output(self.intermediate(attended), attended)


class _Encoder(nn.Module):
    def __init__(self, layers: list[TaggingLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    """RAM's ``tagging_head``: a 2-layer, 4-head BERT without embeddings or self-attention."""

    def __init__(self, cfg: RAMConfig) -> None:
        super().__init__()
        from transformers import BertConfig

        bert_cfg = BertConfig(
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_heads,
            num_hidden_layers=cfg.num_layers,
            intermediate_size=cfg.intermediate_size,
            hidden_act="gelu",  # exact erf GELU, as in RAM's BERT config
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation=cfg.attn_implementation,
        )
        self.encoder = _Encoder([TaggingLayer(bert_cfg, cfg.embed_dim) for _ in range(cfg.num_layers)])

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        hidden = queries
        for layer in self.encoder.layer:
            hidden = layer(hidden, memory)
        return hidden


class RAMSwinL(nn.Module):
    """The RAM Swin-L/384 tagging network (logits only; thresholds live in the tagger)."""

    def __init__(self, cfg: RAMConfig | None = None) -> None:
        super().__init__()
        import timm

        self.cfg = cfg = cfg or RAMConfig()
        self.visual_encoder = timm.create_model(cfg.swin_name, pretrained=False, num_classes=0)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.label_embed = nn.Parameter(torch.zeros(cfg.num_classes, cfg.embed_dim))
        self.wordvec_proj = nn.Linear(cfg.embed_dim, cfg.hidden_size)
        self.tagging_head = TaggingHead(cfg)
        self.fc = nn.Linear(cfg.hidden_size, 1)

    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention memory ``[B, 145, 512]``: projected mean token followed by 144 tokens."""
        tokens = self.visual_encoder.forward_features(x).flatten(1, 2)  # NHWC -> [B, 144, C], row-major
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return self.image_proj(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, 384, 384]`` images -> ``[B, 4585]`` logits."""
        memory = self.image_embeds(x)
        queries = torch.relu(self.wordvec_proj(self.label_embed))
        queries = queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        hidden = self.tagging_head(queries, memory)
        return self.fc(hidden).squeeze(-1)


def build_ram_swin_l(
    cfg: RAMConfig | None = None,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> RAMSwinL:
    """Build the network without initialising its 212 M weights (they come from a checkpoint).

    Construction happens on the meta device (about 0.2 s instead of 3 s of random init). For a real
    ``device`` the storage is then allocated and the non-persistent Swin buffers
    (``relative_position_index``, ``attn_mask``), which no checkpoint supplies, are recomputed. The
    parameters hold garbage until a state dict is loaded.
    """
    if torch.device(device).type != "meta" and not _timm_can_rebuild_buffers():
        # Older timm: no way to refill buffers after meta construction, so pay for the random init.
        with torch.device(device):
            model = RAMSwinL(cfg)
        return model if dtype is None else model.to(dtype=dtype)
    with torch.device("meta"):
        model = RAMSwinL(cfg)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    for module in model.visual_encoder.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return model


def _timm_can_rebuild_buffers() -> bool:
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

    return all(hasattr(c, "init_non_persistent_buffers") for c in (WindowAttention, SwinTransformerBlock))
