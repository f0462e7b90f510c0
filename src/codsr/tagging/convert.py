"""Read the released RAM / DAPE files and turn them into a state dict for :class:`RAMSwinL`.

Layouts (fixture README "File layouts", ARCHITECTURE.md §1, §2, §4, §5):

* ``ram_swin_large_14m.pth`` is ``{'model': state_dict, ...}``. Its tagging-path keys are those under
  ``visual_encoder.``, ``image_proj.``, ``label_embed``, ``wordvec_proj.``, ``tagging_head.`` and
  ``fc.``; everything else (``tag_encoder.*``, ``text_decoder.*``, other top-level entries) belongs
  to RAM's captioning branch and is ignored. The release drops the Swin buffers
  ``relative_position_index`` / ``attn_mask`` (they are rebuilt) and renames the legacy
  ``vision_multi`` to ``tagging_head``; so do we.
* Swin key map to timm: only ``visual_encoder.layers.{i}.downsample.*`` moves to
  ``layers.{i+1}.downsample.*`` (original Swin merges patches at the end of a stage, timm at the
  start of the next one).
* ``DAPE.pth`` (SeeSR) is a flat ``{key: tensor}`` dict of unmerged loralib LoRA factors, r = 8,
  alpha = 1, so ``W_eff = W + (B @ A) / 8``. The Swin ``attn.qkv`` LoRA is a loralib
  ``MergedLinear`` with q and v enabled: ``lora_A`` rows ``[0:8]`` / ``[8:16]`` and ``lora_B`` rows
  ``[0:C]`` / ``[C:2C]`` give the q rows ``[0:C]`` and the v rows ``[2C:3C]`` of the fused weight.
  The tag encoder's layer-0/1 cross-attention query/key weights are the *same tensors* as the
  tagging head's, so their LoRA deltas are merged into the tagging head too (zero in a real file).

Strictness: a missing tagging-path tensor, an unknown key under a tagging-path prefix, or a shape
that does not match raises :class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from functools import lru_cache

import torch

__all__ = [
    "CheckpointError",
    "LORA_ALPHA",
    "LORA_RANK",
    "RAM_TAGGING_PREFIXES",
    "expected_model_shapes",
    "file_key_to_model_key",
    "load_tagger_state_dict",
    "merge_dape",
    "model_key_to_file_key",
    "ram_to_model_state_dict",
    "read_dape_file",
    "read_ram_file",
]

LORA_RANK = 8
LORA_ALPHA = 1.0
RAM_TAGGING_PREFIXES = ("visual_encoder.", "image_proj.", "wordvec_proj.", "tagging_head.", "fc.")
_RAM_TAGGING_KEYS = ("label_embed",)
_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")
# SeeSR/CODSR add these to their own Swin module (not in the upstream file); tags never use them.
_UNUSED_ON_PATH = re.compile(r"^visual_encoder\.layers\.\d+\.blocks\.\d+\.condition_(attention|ffn)\.")
_DOWNSAMPLE_FILE = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.")
_DOWNSAMPLE_MODEL = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.")
_SWIN_QKV = re.compile(r"^visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv\.weight$")
_HEAD_QK = re.compile(r"^tagging_head\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)\.weight$")
_TIED_TAG_ENCODER_LAYERS = (0, 1)


class CheckpointError(ValueError):
    """A RAM or DAPE file does not have the layout the tagger needs."""


# --------------------------------------------------------------------------------------------
# key names


def file_key_to_model_key(key: str) -> str:
    """Release (original Swin) key -> :class:`RAMSwinL` (timm) key; ARCHITECTURE.md §5."""
    m = _DOWNSAMPLE_FILE.match(key)
    if m:
        return f"visual_encoder.layers.{int(m.group(1)) + 1}.downsample." + key[m.end() :]
    return key


def model_key_to_file_key(key: str) -> str:
    """Inverse of :func:`file_key_to_model_key` (used to name keys as they appear in the file)."""
    m = _DOWNSAMPLE_MODEL.match(key)
    if m:
        return f"visual_encoder.layers.{int(m.group(1)) - 1}.downsample." + key[m.end() :]
    return key


def _on_tagging_path(key: str) -> bool:
    return key in _RAM_TAGGING_KEYS or key.startswith(RAM_TAGGING_PREFIXES)


@lru_cache(maxsize=4)
def expected_model_shapes(cfg=None) -> dict[str, torch.Size]:
    """Parameter names and shapes of :class:`RAMSwinL` (built on the meta device, no memory)."""
    from codsr.tagging.model import build_ram_swin_l

    return {k: v.shape for k, v in build_ram_swin_l(cfg, device="meta").state_dict().items()}


# --------------------------------------------------------------------------------------------
# reading files


def _torch_load(path: str | os.PathLike, what: str) -> object:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    # mmap avoids reading the whole 5.6 GB RAM file (most of it is not on the tagging path);
    # torch only supports it for the zip format, so legacy files are read normally.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused this {what}: it stores Python objects "
            f"besides tensors and plain containers ({str(exc).splitlines()[0]}). codsr never unpickles "
            "arbitrary objects. If you trust the file, keep only its weights once, e.g.\n"
            f"  python -c \"import torch; sd = torch.load({path!r}, map_location='cpu', weights_only=False); "
            "torch.save({'model': sd['model']} if 'model' in sd else sd, 'weights_only.pth')\"\n"
            "and pass weights_only.pth instead."
        ) from exc


def _check_tensor_dict(sd: Mapping, path: str, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {what} entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k] = v
    return out


def read_ram_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of ``ram_swin_large_14m.pth`` (``{'model': sd}``; a bare state dict is accepted)."""
    path = os.fspath(path)
    obj = _torch_load(path, "RAM checkpoint")
    if isinstance(obj, Mapping) and obj and all(str(k).endswith(("lora_A", "lora_B")) for k in obj):
        raise CheckpointError(
            f"{path}: this is a LoRA file (DAPE.pth?), pass it as dape_path, not as the RAM file"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and "label_embed" in obj:
        sd = obj
    else:
        top = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a RAM checkpoint: expected {{'model': state_dict}} as in "
            f"ram_swin_large_14m.pth, found top-level {top}"
        )
    return _check_tensor_dict(sd, path, "state-dict")


def read_dape_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` LoRA dict of ``DAPE.pth``.

    The release loads it with ``load_state_dict(strict=False)``, so a wrapped dict (``{'model': ...}``)
    would silently leave plain RAM; here it is an error.
    """
    path = os.fspath(path)
    obj = _torch_load(path, "DAPE LoRA file")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a flat {{key: tensor}} dict, found {type(obj).__name__}")
    wrapped = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if wrapped:
        raise CheckpointError(
            f"{path}: DAPE.pth must be a flat {{key: tensor}} dict of LoRA factors, but entry "
            f"{wrapped[0]!r} is a nested dict; unwrap it (e.g. torch.save(obj[{wrapped[0]!r}], path))"
        )
    sd = _check_tensor_dict(obj, path, "DAPE")
    for k in sd:
        if not k.endswith(("lora_A", "lora_B")):
            raise CheckpointError(
                f"{path}: unexpected key {k!r} in DAPE file: only '...lora_A' / '...lora_B' tensors are allowed"
            )
    return sd


# --------------------------------------------------------------------------------------------
# RAM -> model


def ram_to_model_state_dict(
    ram_sd: Mapping[str, torch.Tensor],
    source: str = "RAM checkpoint",
    expected: Mapping[str, torch.Size] | None = None,
) -> dict[str, torch.Tensor]:
    """Select, rename and check the tagging-path tensors of a RAM state dict (strict).

    ``source`` names the file in error messages. Tensors are shared with ``ram_sd`` (no copy).
    """
    expected = expected_model_shapes() if expected is None else expected
    out: dict[str, torch.Tensor] = {}
    for key, value in ram_sd.items():
        key = key.replace("vision_multi", "tagging_head")  # legacy name, as the release does
        if not _on_tagging_path(key) or key.endswith(_DROPPED_BUFFERS) or _UNUSED_ON_PATH.match(key):
            continue
        model_key = file_key_to_model_key(key)
        if model_key not in expected:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} on the tagging path (not part of RAM Swin-L/384)"
            )
        if tuple(value.shape) != tuple(expected[model_key]):
            hint = ""
            if key.endswith("relative_position_bias_table"):
                hint = " (only the 12x12-window Swin-L/384 RAM is supported; tables are not resampled)"
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[model_key])}{hint}"
            )
        if model_key in out:
            raise CheckpointError(
                f"{source}: key {key!r} appears twice (legacy 'vision_multi' and 'tagging_head')"
            )
        out[model_key] = value
    missing = [model_key_to_file_key(k) for k in expected if k not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more} needed for tagging")
    return out


# --------------------------------------------------------------------------------------------
# DAPE LoRA merge


def _lora_targets(expected: Mapping[str, torch.Size]) -> dict[str, str]:
    """LoRA prefix in the DAPE file (``'...qkv'``) -> model weight key, for the tagging path."""
    targets = {}
    for key in expected:
        if _SWIN_QKV.match(key) or _HEAD_QK.match(key):
            targets[key[: -len(".weight")]] = key
    return targets


def _tied_targets(expected: Mapping[str, torch.Size]) -> dict[str, str]:
    """Tag-encoder LoRA prefixes whose base weight is the tagging head's (ARCHITECTURE.md §4)."""
    out = {}
    for key in expected:
        m = _HEAD_QK.match(key)
        if m and int(m.group(1)) in _TIED_TAG_ENCODER_LAYERS:
            out[f"tag_encoder.encoder.layer.{m.group(1)}.crossattention.self.{m.group(2)}"] = key
    return out


def _lora_delta(
    prefix: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, source: str
) -> torch.Tensor:
    """``scaling · ΔW`` in float32 for a loralib Linear or the q/v MergedLinear of Swin's qkv."""
    r, scaling = LORA_RANK, LORA_ALPHA / LORA_RANK
    a, b = a.float(), b.float()
    out_f, in_f = weight.shape
    if prefix.endswith(".attn.qkv"):
        c = in_f
        if tuple(a.shape) != (2 * r, c) or tuple(b.shape) != (2 * c, r) or out_f != 3 * c:
            raise CheckpointError(
                f"{source}: {prefix}.lora_A/B have shapes {tuple(a.shape)}/{tuple(b.shape)}, expected "
                f"{(2 * r, c)}/{(2 * c, r)} (q/v MergedLinear, r={r})"
            )
        delta = torch.zeros(out_f, in_f, dtype=torch.float32)
        delta[:c] = (b[:c] @ a[:r]) * scaling  # q rows
        delta[2 * c :] = (b[c:] @ a[r:]) * scaling  # v rows; the k rows [c:2c] have no LoRA
        return delta
    if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
        raise CheckpointError(
            f"{source}: {prefix}.lora_A/B have shapes {tuple(a.shape)}/{tuple(b.shape)}, expected "
            f"{(r, in_f)}/{(out_f, r)} (r={r})"
        )
    return (b @ a) * scaling


def merge_dape(
    model_sd: Mapping[str, torch.Tensor],
    dape_sd: Mapping[str, torch.Tensor],
    source: str = "DAPE file",
    merge_tied: bool = True,
) -> dict[str, torch.Tensor]:
    """Return ``model_sd`` with the DAPE LoRA merged (float32) into the affected weights.

    ``merge_tied`` adds the tag encoder's layer-0/1 cross-attention query/key deltas to the shared
    tagging-head weights, as loralib's ``.eval()`` does in the release; with ``False`` a non-zero
    delta there is rejected instead. Other ``tag_encoder`` / ``text_decoder`` factors are ignored.
    """
    expected = {k: v.shape for k, v in model_sd.items()}
    targets = _lora_targets(expected)
    tied = _tied_targets(expected)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in dape_sd.items():
        prefix, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise CheckpointError(f"{source}: unexpected key {key!r}: not a LoRA factor")
        if prefix in targets or prefix in tied:
            pairs.setdefault(prefix, {})[part] = value
        elif _on_tagging_path(key):
            raise CheckpointError(
                f"{source}: unexpected key {key!r} on the tagging path (no LoRA there in DAPE)"
            )
        # else: tag_encoder / text_decoder LoRA, off the tagging path
    for prefix in targets:
        for part in ("lora_A", "lora_B"):
            if part not in pairs.get(prefix, {}):
                raise CheckpointError(
                    f"{source}: missing key {prefix + '.' + part!r} (DAPE LoRA on the tagging path)"
                )
    for prefix, parts in pairs.items():
        if prefix in tied and len(parts) != 2:
            missing = "lora_B" if "lora_A" in parts else "lora_A"
            raise CheckpointError(f"{source}: {prefix}.{missing} is missing while its pair is present")

    out = dict(model_sd)
    for prefix in [*tied, *targets]:  # release order: tag_encoder merges before tagging_head
        if prefix not in pairs:
            continue
        weight_key = tied.get(prefix) or targets[prefix]
        a, b = pairs[prefix]["lora_A"], pairs[prefix]["lora_B"]
        if prefix in tied and not torch.any(b):
            continue  # B = 0: loralib's initial value, the case of every real DAPE.pth
        if prefix in tied and not merge_tied:
            raise CheckpointError(
                f"{source}: {prefix}.lora_B is non-zero; its base weight is shared with the tagging head "
                "(pass merge_tied=True to merge it there as the release does)"
            )
        delta = _lora_delta(prefix, a, b, out[weight_key], source)
        out[weight_key] = out[weight_key].float() + delta
    return out


def load_tagger_state_dict(
    ram_path: str | os.PathLike,
    dape_path: str | os.PathLike | None = None,
    merge_tied: bool = True,
) -> dict[str, torch.Tensor]:
    """Read a RAM file (and optionally a DAPE file) into a strict :class:`RAMSwinL` state dict."""
    sd = ram_to_model_state_dict(read_ram_file(ram_path), source=os.fspath(ram_path))
    if dape_path is not None:
        sd = merge_dape(sd, read_dape_file(dape_path), source=os.fspath(dape_path), merge_tied=merge_tied)
    return sd
