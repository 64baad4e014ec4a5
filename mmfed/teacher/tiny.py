"""A tiny random Stable-Diffusion-architecture model, saved in SD's folder layout.

Why: no SD checkpoint can be downloaded here, and tests must exercise the real loading path
(`StableDiffusionTeacher.load` -> ``from_pretrained(subfolder=...)``). The parts are SD's own classes
(CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel with SD's 4 down/up block types,
DDPMScheduler with SD's "scaled_linear" betas), only with a handful of channels, so building and
saving takes about a second. `mmfed teacher pretrain` trains the same architecture at a larger size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import mmfed  # noqa: F401  (the torchvision guard, before diffusers/transformers)
from mmfed.utils.io import save_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_VOCAB = (
    "a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "triangle", "star", "on",
    "background", "striped", "plain", "dotted", "checkered",
)  # fmt: skip
# SD's block types: 3 cross-attention stages and a plain one at the bottom, mirrored on the way up.
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# SD 1.x's noise schedule (its scheduler_config.json, less the PNDM-only keys).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
PARTS = {  # subfolder -> (library, class name), as written into model_index.json
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "DDPMScheduler"),
}


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct pre-tokens CLIP's tokenizer splits `texts` into (letters runs, digits, punctuation)."""
    import regex

    pattern = regex.compile(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    seen: dict[str, None] = {}
    for text in texts:
        for word in pattern.findall(text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def bpe_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary + merges, in CLIP's format, under which every word of `words` is one token.

    BPE is trained (tokenizers' BpeTrainer, CLIP's normalizer and pre-tokenizer) on `words` until no
    pair is left to merge: applying learned merges to a training word replays its training
    segmentation, so each ends as one ``word</w>`` token. Hand-written per-word merge chains do not
    have this property (another word's earlier merge splits them). ASCII letters, digits and common
    punctuation are in the vocabulary alone and as ``c</w>``, so other text tokenizes without unknowns.
    """
    import string

    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    alphabet = [*string.ascii_lowercase, *string.digits, *"-.,'!?"]
    tokenizer = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])  # CLIP's normalizer + pre-tokenizer
    corpus = [*alphabet, *words]
    trainer = BpeTrainer(
        # an upper bound (specials, characters with and without </w>, one token per merge): merge until
        # nothing is left to merge
        vocab_size=2 + 2 * len(set("".join(corpus))) + sum(map(len, corpus)),
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.backend_tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def write_tokenizer(folder: Path, words: Sequence[str], max_length: int) -> Any:
    """A CLIPTokenizer over `words`, saved to `folder` (vocab.json, merges.txt + the library's files)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab(words)
    save_json(vocab, folder / "vocab.json")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_parts(
    *,
    vocab_size: int,
    eos_token_id: int,
    sample_size: int = 8,
    text_width: int = 32,
    text_layers: int = 2,
    max_length: int = 16,
    vae_channels: Sequence[int] = (8, 16),
    unet_channels: Sequence[int] = (8, 16, 16, 16),
    layers_per_block: int = 1,
    attention_head_dim: int = 4,
    norm_groups: int = 4,
    text_time_heads: int | None = None,
) -> dict[str, Any]:
    """Freshly initialised SD parts (text encoder, VAE, U-Net, scheduler); the caller seeds torch.

    `text_time_heads`: also add an attention-pooled prompt embedding to the U-Net's timestep embedding
    (diffusers' ``addition_embed_type="text"``, with that many pooling heads), so every ResNet block
    sees the prompt, as class-conditional DDPMs (ADM) see their class; None: cross-attention only, as SD.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 16),
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=eos_token_id,  # not 2: CLIP then pools at the first EOS, not at argmax(ids)
        pad_token_id=eos_token_id,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=sample_size * 2 ** (len(vae_channels) - 1),
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=DOWN_BLOCKS,
        up_block_types=UP_BLOCKS,
        block_out_channels=tuple(unet_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_groups,
        **(
            {"addition_embed_type": "text", "addition_embed_type_num_heads": text_time_heads}
            if text_time_heads
            else {}
        ),
    )
    return {
        "text_encoder": CLIPTextModel(text_config),
        "vae": vae,
        "unet": unet,
        "scheduler": DDPMScheduler(**SD_SCHEDULER),
    }


def save_sd_folder(folder: Path, parts: dict[str, Any]) -> None:
    """Save `parts` (all of PARTS) with save_pretrained in SD's layout, with a model_index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        if name != "tokenizer":  # written by write_tokenizer (vocab.json/merges.txt kept as written)
            part.save_pretrained(str(folder / name))
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _version()}
    index |= {name: list(library_class) for name, library_class in PARTS.items()}
    index |= {
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    save_json(index, folder / "model_index.json")


def _version() -> str:
    import diffusers

    return diffusers.__version__


def build_tiny_sd(
    folder: str | Path,
    *,
    seed: int = 0,
    sample_size: int = 8,
    vocab: list[str] | None = None,
    max_length: int = 16,
    text_width: int = 32,
    unet_channels: Sequence[int] = (8, 16, 16, 16),
    vae_channels: Sequence[int] = (8, 16),
) -> Path:
    """Write a tiny random SD model to `folder` and return it (images: sample_size * 2 px square).

    `vocab`: the words the tokenizer knows as whole tokens (default: a few synthetic-world words);
    the model is deterministic in `seed` and does not touch torch's global RNG state.
    """
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer", list(vocab or DEFAULT_VOCAB), max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = tiny_parts(
            vocab_size=len(tokenizer.get_vocab()),
            eos_token_id=tokenizer.eos_token_id,
            sample_size=sample_size,
            text_width=text_width,
            max_length=max_length,
            vae_channels=vae_channels,
            unet_channels=unet_channels,
        )
    save_sd_folder(folder, parts)
    return folder
