"""Modality encoders, selectable by name (``model/image_encoder=cnn``, ``model/text_encoder=hf`` ...).

Every encoder owns its input preparation, so data stays raw (uint8 images, caption strings) and
each client can use a different architecture:
- image encoders: ``prepare(uint8 [B, 3, H, W]) -> float input`` and ``forward(input) -> [B, output_dim]``;
- text encoders: ``prepare(list[str]) -> dict of tensors`` and ``forward(tokens) -> [B, output_dim]``.
The projection into the shared latent space (``output_dim -> D``) is added by `MultimodalModel`.

Real encoders (open_clip towers, Hugging Face text models) load by hub id or local folder when
`pretrained` is set, and are built with random weights from their config when it is not.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from mmfed.config import check_choice, check_positive, register
from mmfed.models.tokenizer import HashingTokenizer


class PretrainedLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and where it was looked for."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _load_error(kind: str, name: str, error: Exception, hint: str) -> PretrainedLoadError:
    where = "the local folder and the Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if _offline() else "")
    first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    return PretrainedLoadError(f"could not load {kind} '{name}' from {where}: {first}. {hint}")


# ----------------------------------------------------------------------------- image encoders
@register("model/image_encoder", "cnn")
class SmallCNN(nn.Module):
    """A small conv net for 32-64 px images: three stages of 3x3 convs, each with a norm layer.

    `norm="batch"` (default) learns the synthetic shapes about twice as fast as GroupNorm (measured:
    48% vs 25% shape accuracy after 3 central epochs); FedAvg averages its running statistics like
    any other tensor. `norm="group"` avoids batch statistics altogether, for strongly non-IID
    features. The last feature map is flattened (not pooled) so position survives into the embedding.
    `channels_last=True` (default) keeps the conv weights and activations in NHWC memory order,
    which oneDNN's CPU convolutions run faster: a training step of this CNN 1.4x in float32 and
    1.6x in bfloat16 (README, "Performance"); the same values up to float rounding (a different
    summation order). `false` is the NCHW layout the figures before 2026-12-03 were measured with.
    """

    NORMS = ("batch", "group")

    def __init__(
        self,
        width: int = 32,
        image_size: int = 32,
        feature_grid: int = 4,
        norm: str = "batch",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        check_positive("width", width)
        check_choice("norm", norm, self.NORMS)
        if image_size < 16 or image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 16, got {image_size}")
        self.image_size = image_size

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(min(8, cout), cout)
            return [conv, layer, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width),
            nn.MaxPool2d(2),  # [B, w, S/2, S/2]
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),  # [B, 2w, S/4, S/4]
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(feature_grid),  # [B, 4w, g, g]
        )
        self.output_dim = 4 * width * feature_grid * feature_grid
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.features.to(memory_format=torch.channels_last)  # the conv weights (4-D tensors)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, S, S] in [-1, 1]."""
        x = images.float().div_(127.5).sub_(1.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels).flatten(1)


@register("model/image_encoder", "vit")
class SmallViT(nn.Module):
    """A small vision transformer (patches -> pre-norm encoder -> mean pool), a second image kind.

    It gives model-heterogeneous federations an image encoder whose weights cannot be averaged with
    the CNN's: only representations can be exchanged between the two.
    """

    def __init__(
        self, width: int = 96, layers: int = 2, heads: int = 4, patch_size: int = 4, image_size: int = 32
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.image_size = image_size
        self.patches = nn.Conv2d(3, width, patch_size, stride=patch_size)  # [B, W, S/p, S/p]
        count = (image_size // patch_size) ** 2
        self.position = nn.Parameter(torch.randn(count, width) / math.sqrt(width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_dim = width

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(127.5).sub_(1.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(pixels).flatten(2).transpose(1, 2) + self.position  # [B, N, W]
        return self.norm(self.encoder(tokens)).mean(dim=1)


@register("model/image_encoder", "open_clip")
class OpenCLIPImageEncoder(nn.Module):
    """The image tower of an open_clip model (e.g. ``ViT-B-32``).

    `pretrained` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``), an ``hf-hub:`` id or a
    local checkpoint file; ``None`` builds the architecture with random weights.
    """

    def __init__(
        self, model_name: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None
    ) -> None:
        super().__init__()
        model = _create_open_clip(model_name, pretrained, cache_dir)
        self.visual = model.visual
        size = self.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(self.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(self.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.output_dim = int(self.visual.output_dim)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True).clamp_(0, 1)
        # Raw images may still be on the CPU while the model (and so mean/std) sits on the GPU.
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def _create_open_clip(model_name: str, pretrained: str | None, cache_dir: str | None) -> nn.Module:
    import open_clip

    known = open_clip.list_models()
    if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model_name={model_name!r} is not an open_clip model (see open_clip.list_models())")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
    except (OSError, RuntimeError, ValueError) as error:
        raise _load_error(
            "open_clip model",
            f"{model_name}:{pretrained}",
            error,
            "Set pretrained to a local checkpoint file, or pretrained=null for random weights.",
        ) from error


# ----------------------------------------------------------------------------- text encoders
class _TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_length: int) -> None:
        super().__init__()
        self.tokenizer = HashingTokenizer(vocab_size=vocab_size, max_length=max_length)
        self.embedding = nn.Embedding(vocab_size, width, padding_idx=0)

    def prepare(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, W], mask [B, L] -> [B, W]: mean over real tokens only."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@register("model/text_encoder", "transformer")
class SmallTransformerText(_TokenEmbedding):
    """A small pre-norm transformer over hashed word tokens, mean-pooled."""

    def __init__(
        self,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        vocab_size: int = 8192,
        max_length: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(vocab_size, width, max_length)
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.position = nn.Parameter(torch.randn(max_length, width) / math.sqrt(width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_dim = width

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = tokens["input_ids"], tokens["attention_mask"]  # [B, L]
        x = self.embedding(ids) + self.position[: ids.shape[1]]  # [B, L, W]
        padding = mask == 0
        # Tokens are left-aligned, so position 0 is padding only for a text without words ("", "!!!").
        # Keep it as a key: a row with every key masked gives NaN attention (in eval mode).
        padding[:, 0] = False
        x = self.encoder(x, src_key_padding_mask=padding)
        return _masked_mean(self.norm(x), mask)


@register("model/text_encoder", "gru")
class GRUText(_TokenEmbedding):
    """A bidirectional GRU over hashed word tokens, mean-pooled."""

    def __init__(self, width: int = 128, vocab_size: int = 8192, max_length: int = 32) -> None:
        super().__init__(vocab_size, width, max_length)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.output_dim = 2 * width

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        # Packed, so the backward direction starts at each text's last word, not at the batch's
        # padding: a caption gets the same embedding whatever it is batched with.
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(ids), lengths, batch_first=True, enforce_sorted=False
        )
        hidden, _ = self.gru(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=ids.shape[1])
        return _masked_mean(hidden, mask)  # [B, 2W]


@register("model/text_encoder", "hf")
class HFTextEncoder(nn.Module):
    """A Hugging Face text model (BERT, DistilBERT, RoBERTa ...) by hub id or local folder.

    With ``pretrained=false`` only the config (and tokenizer) are read and weights are random.
    """

    POOLINGS = ("mean", "cls")

    def __init__(
        self,
        model: str = "distilbert-base-uncased",
        pretrained: bool = True,
        local_files_only: bool = False,
        pooling: str = "mean",
        max_length: int = 64,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("pooling", pooling, self.POOLINGS)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        options = {"local_files_only": local_files_only, "revision": revision}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, **options)
            if pretrained:
                self.model = AutoModel.from_pretrained(model, **options)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(model, **options))
        except OSError as error:
            hint = "Pass a local folder saved with save_pretrained, or allow downloads."
            raise _load_error("Hugging Face model", model, error, hint) from error
        self.pooling = pooling
        self.max_length = max_length
        self.output_dim = int(self.model.config.hidden_size)

    def prepare(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"]
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else _masked_mean(hidden, mask)


@register("model/text_encoder", "open_clip")
class OpenCLIPTextEncoder(nn.Module):
    """The text tower of an open_clip model, with open_clip's own tokenizer."""

    def __init__(
        self, model_name: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None
    ) -> None:
        super().__init__()
        import open_clip

        model = _create_open_clip(model_name, pretrained, cache_dir)
        model.visual = None  # only the text tower is trained here; free the image tower
        self.model = model
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as error:
            raise _load_error(
                "open_clip tokenizer",
                model_name,
                error,
                "Its Hugging Face tokenizer must be in the local cache.",
            ) from error
        self.output_dim = _text_output_dim(model)

    def prepare(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(texts)}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"])


def _text_output_dim(model: nn.Module) -> int:
    """Width of ``encode_text`` for both open_clip layouts: `CLIP` (``text_projection`` a [W, D]
    parameter, a Linear, or None) and `CustomTextCLIP` (SigLIP, HF text towers: ``model.text``)."""
    text = getattr(model, "text", None)
    if text is not None and getattr(text, "output_dim", None):
        return int(text.output_dim)
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, nn.Linear):
        return int(projection.out_features)
    if projection is not None:
        return int(projection.shape[1])
    return int(model.transformer.width)
