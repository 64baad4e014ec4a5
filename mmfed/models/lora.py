"""LoRA adapters (peft) on a client's encoder towers, and the model that keeps them personal.

Why this module exists:
- **Where adapters go** depends on the encoder: attention and linear layers of transformers,
  conv/linear layers of CNNs. `default_targets` picks them by module type per registered encoder
  name (``cnn``, ``vit``, ``transformer``, ``gru``, ``hf``, ``open_clip``); `target_modules`
  overrides with peft's own name/suffix rule. Two traps of PyTorch's attention are handled here:
  ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, so a LoRA on ``out_proj`` alone does
  nothing (refused; peft's MultiheadAttention LoRA covers in- and out-projection), and
  ``nn.TransformerEncoderLayer`` takes a fused "fast path" in eval mode that reads the base weights
  and skips every adapter inside the layer (disabled per adapted layer, see `_fix_attention`).
  peft 0.21's MultiheadAttention LoRA merges into the weights around each forward; its rounding
  would move the frozen weights, so they are restored bit-exactly (and it applies the out_proj
  delta twice, W + 2 dW: a fixed reparametrisation that saving and loading reproduce).
- **Adapters are personal** and the base weights are shared: `AdaptedModel` reports and loads its
  parts under the *base* model's tensor names (peft's ``base_model.model.`` / ``.base_layer``
  wrappers removed), so FedAvg averages the base weights with the global model's, while every tensor
  whose name contains ``lora_`` (and the heads, with `personal_heads`) stays with the client
  (`is_personal`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mmfed.models.encoders  # noqa: F401  (fills the encoder registries that `encoder_kind` reads)
from mmfed.config import check_positive, register, registered
from mmfed.models.multimodal import MultimodalModel, Tower

ADAPTER_MARK = "lora_"  # peft's adapter tensors: lora_A, lora_B, lora_embedding_A/B, ...
ENCODER_PARTS = ("image_encoder", "text_encoder")
HEAD_PARTS = ("image_head", "text_head")
# Layer types that get adapters by default, per registered encoder name. The Tower's projection is
# an nn.Linear and is included everywhere. nn.GRU has no peft LoRA layer: a GRU encoder adapts its
# token embedding and the projection.
DEFAULT_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "cnn": (nn.Conv2d, nn.Linear),
    "vit": (nn.MultiheadAttention, nn.Linear),
    "transformer": (nn.MultiheadAttention, nn.Linear),
    "gru": (nn.Embedding, nn.Linear),
    "open_clip": (nn.MultiheadAttention, nn.Linear),
}


@register("model/lora", "default")
class LoraSettings:
    """LoRA adapters on client encoders: rank, alpha (scaling alpha / rank), dropout, targets.

    `image_target_modules` / `text_target_modules` override the per-encoder defaults with module
    names or name suffixes inside the tower (peft's rule, e.g. ``[linear1, linear2, projection]``).
    During federation (``model/lora=default``), `personal_heads` keeps the classification heads with
    the client as well (never sent, never averaged), as in FedPer/FedRep.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        image_target_modules: list[str] | None = None,
        text_target_modules: list[str] | None = None,
        personal_heads: bool = True,
    ) -> None:
        check_positive("rank", rank)
        check_positive("alpha", alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = {"image_encoder": image_target_modules, "text_encoder": text_target_modules}
        self.personal_heads = personal_heads

    def wrap(self, model: MultimodalModel, train_base: bool = True) -> AdaptedModel:
        """Adapters on every encoder of `model` (during federation the base keeps training)."""
        personal = HEAD_PARTS if self.personal_heads else ()
        return add_adapters(model, self, train_base=train_base, personal_parts=personal)


# ----------------------------------------------------------------------------- where adapters go
def encoder_kind(tower: Tower) -> str:
    """The registered name of the tower's encoder (``cnn``, ``hf`` ...), from the encoder registries."""
    for group in ("model/image_encoder", "model/text_encoder"):
        for name, cls in registered(group).items():
            if type(tower.encoder) is cls:
                return name
    raise ValueError(
        f"encoder {type(tower.encoder).__name__} is not a registered encoder: "
        "set image_target_modules / text_target_modules"
    )


def _attention_children(tower: nn.Module) -> set[str]:
    """Names of the linear layers that nn.MultiheadAttention owns (it bypasses their forward)."""
    return {
        f"{name}.{child}" if name else child
        for name, module in tower.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }


def default_targets(tower: Tower, train_base: bool = False) -> list[str]:
    """Full module names (inside `tower`) that get adapters by default for its encoder kind.

    With `train_base`, attention layers are left out: peft's MultiheadAttention LoRA merges the
    adapter into the base weight at every forward, which only works when that weight is frozen.
    """
    kind = encoder_kind(tower)
    inside_attention = _attention_children(tower)
    if kind == "hf":  # peft's per-architecture defaults (attention query/value for BERT-likes)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

        model_type = tower.encoder.model.config.model_type
        if model_type not in MAPPING:
            raise ValueError(
                f"no default LoRA targets for Hugging Face model_type {model_type!r}: set "
                "text_target_modules (module names, e.g. [q_proj, v_proj])"
            )
        leaves = set(MAPPING[model_type])
        names = [n for n, _ in tower.named_modules() if n.rsplit(".", 1)[-1] in leaves]
        return [*names, "projection"]
    types = tuple(t for t in DEFAULT_TYPES[kind] if not (train_base and t is nn.MultiheadAttention))
    return [
        name
        for name, module in tower.named_modules()
        if name and isinstance(module, types) and name not in inside_attention
    ]


def resolve_targets(tower: Tower, targets: list[str] | None, key: str, train_base: bool = False) -> list[str]:
    """Explicit module names for `targets` (names or suffixes, peft's rule); defaults when None."""
    if targets is None:
        return default_targets(tower, train_base)
    names = [name for name, _ in tower.named_modules() if name]
    inside_attention = _attention_children(tower)
    resolved: list[str] = []
    for target in targets:
        matched = [n for n in names if n == target or n.endswith(f".{target}")]
        if not matched:
            raise ValueError(
                f"{key}: {target!r} matches no module of the {type(tower.encoder).__name__} tower"
            )
        trapped = [n for n in matched if n in inside_attention]
        if trapped:
            raise ValueError(
                f"{key}: {trapped[0]!r} belongs to an nn.MultiheadAttention, which reads its weight "
                "directly, so a LoRA on it would do nothing; target the attention module itself"
            )
        resolved += [n for n in matched if n not in resolved]
    return resolved


# ----------------------------------------------------------------------------- wrapping
def _fix_attention(tower: nn.Module) -> None:
    """Make attention adapters count in eval mode and leave the frozen base weights bit-exact.

    1. nn.TransformerEncoderLayer's eval fast path calls a fused kernel with the layer's *base*
       weights (``self_attn.in_proj_weight``, ``linear1.weight`` ...), silently skipping every
       adapter inside; PyTorch skips that path for a layer with a forward pre-hook, so adapted
       layers get a no-op one.
    2. peft's MultiheadAttention LoRA adds the adapter into the weights before each forward and
       subtracts it after: (W + dW) - dW drifts from W by rounding, so "frozen" weights would change
       a little at every step. The hooks below put the original weight storage back after forward.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraAttention

    for module in tower.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not module._forward_pre_hooks:
            if any(isinstance(m, LoraLayer) for m in module.modules()):
                module.register_forward_pre_hook(_no_op)
        if isinstance(module, LoraAttention):
            module.register_forward_pre_hook(_pin_attention_weights)
            module.register_forward_hook(_unpin_attention_weights)


def _no_op(module: nn.Module, args: Any) -> None:
    return None


def _pin_attention_weights(module: nn.Module, args: Any) -> None:
    base = module.get_base_layer()
    module.__dict__["_pinned"] = (base.in_proj_weight.data, base.out_proj.get_base_layer().weight.data)


def _unpin_attention_weights(module: nn.Module, args: Any, output: Any) -> None:
    base = module.get_base_layer()
    in_proj, out_proj = module.__dict__.pop("_pinned")
    base.in_proj_weight.data = in_proj
    base.out_proj.get_base_layer().weight.data = out_proj


def lora_config(settings: LoraSettings, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
    )


def adapt_tower(tower: Tower, settings: LoraSettings, part: str, train_base: bool = False) -> nn.Module:
    """`tower` with peft LoRA layers injected (a PeftModel; `prepare` and `forward` still work)."""
    from peft import get_peft_model

    key = f"{part.removesuffix('_encoder')}_target_modules"
    targets = resolve_targets(tower, settings.target_modules[part], key, train_base)
    if train_base:
        attention = [n for n in targets if isinstance(tower.get_submodule(n), nn.MultiheadAttention)]
        if attention:
            raise ValueError(
                f"{key}: {attention[0]!r} is an nn.MultiheadAttention, whose LoRA (peft) needs frozen base "
                "weights; during federation target linear layers only"
            )
    trainable = {name for name, param in tower.named_parameters() if param.requires_grad}
    try:
        adapted = get_peft_model(tower, lora_config(settings, targets))
    except (ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{key}: peft cannot adapt {targets}: {first}") from error
    if train_base:  # peft froze the base; during federation it trains as before
        for name, param in adapted.named_parameters():
            if base_name(name) in trainable:
                param.requires_grad_(True)
    _fix_attention(adapted)
    return adapted


def load_adapted_tower(tower: Tower, folder: str | Path) -> nn.Module:
    """`tower` (e.g. a copy of the global one) with the adapters saved in `folder` (peft format)."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder}/adapter_config.json does not exist: not a saved adapter")
    adapted = PeftModel.from_pretrained(tower, str(folder))
    _fix_attention(adapted)
    return adapted


def add_adapters(
    model: MultimodalModel,
    settings: LoraSettings,
    train_base: bool = False,
    personal_parts: Iterable[str] = (),
    parts: Iterable[str] = ENCODER_PARTS,
) -> AdaptedModel:
    """An `AdaptedModel` whose encoder parts carry LoRA adapters (the parts are modified in place).

    Without `train_base` only the adapters and the heads train (personalization of a finished
    federation); with it the base weights train too and are exchanged as usual (during federation).
    """
    built: dict[str, nn.Module] = {}
    for name in model.part_names:
        part = getattr(model, name)
        built[name] = adapt_tower(part, settings, name, train_base) if name in parts else part
    return AdaptedModel(built, train_base=train_base, personal_parts=personal_parts)


# ----------------------------------------------------------------------------- the personal model
def base_name(key: str) -> str:
    """A tensor name without peft's wrappers: what the un-adapted module calls it."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def is_adapter(key: str) -> bool:
    return ADAPTER_MARK in key


def is_personal(model: MultimodalModel, key: str) -> bool:
    """Whether the ``part/param`` tensor `key` stays with the client (never sent, never averaged)."""
    if not isinstance(model, AdaptedModel):
        return False
    return is_adapter(key) or key.partition("/")[0] in model.personal_parts


class AdaptedModel(MultimodalModel):
    """A MultimodalModel whose encoders carry LoRA adapters.

    Tensors are named as in the un-adapted model (`base_name`), so its base weights load from and
    average with the global model's. A part loads its base weights (the server's payload), its
    adapters (the client's state), or both; each group complete or absent.
    Without `train_base`, base weights are frozen and batch-norm layers stay in eval mode (their
    running statistics are base state too), so the adapters alone carry what the client learned.
    """

    def __init__(
        self, parts: dict[str, nn.Module], train_base: bool = False, personal_parts: Iterable[str] = ()
    ) -> None:
        super().__init__(parts)
        self.train_base = train_base
        self.personal_parts = tuple(p for p in personal_parts if p in self.part_names)
        if not train_base and self.has("logit_scale"):
            self.logit_scale.requires_grad_(False)

    @property
    def adapted_parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.part_names if any(is_adapter(k) for k in getattr(self, p).state_dict()))

    def train(self, mode: bool = True) -> AdaptedModel:
        super().train(mode)
        if not self.train_base:
            for part in self.adapted_parts:
                for module in getattr(self, part).modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def tensor_name(self, key: str) -> str:
        return base_name(key)

    def load_part_state(self, state: dict[str, torch.Tensor], strict_parts: bool = True) -> list[str]:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            part, _, param = key.partition("/")
            if part not in self.part_names:
                if strict_parts:
                    raise KeyError(
                        f"tensor '{key}' is for part '{part}', which this model does not have "
                        f"(it has {', '.join(self.part_names)})"
                    )
                continue
            grouped.setdefault(part, {})[param] = value
        for part, part_state in grouped.items():
            module = getattr(self, part)
            names = {base_name(k): k for k in module.state_dict()}
            unknown = [k for k in part_state if k not in names]
            if unknown:
                raise KeyError(f"tensor '{part}/{unknown[0]}' is not a tensor of part '{part}'")
            for group in (False, True):  # base weights (from the server) and adapters (personal state)
                given = [k for k in part_state if is_adapter(k) == group]
                missing = [k for k in names if is_adapter(k) == group and k not in part_state]
                if given and missing:
                    raise KeyError(f"part '{part}': tensor '{missing[0]}' is missing")
            module.load_state_dict({names[k]: v for k, v in part_state.items()}, strict=False)
        return list(grouped)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.part_state().items() if is_adapter(k)}


def count_parameters(module: nn.Module, adapters: bool) -> int:
    """Parameters of `module` that are (or, with adapters=False, are not) LoRA adapter tensors."""
    return sum(p.numel() for n, p in module.named_parameters() if is_adapter(n) == adapters)


def clone_parts(model: MultimodalModel, parts: Iterable[str]) -> MultimodalModel:
    """A plain model holding deep copies of `parts` of `model` (e.g. a client's parts of the global one)."""
    return MultimodalModel({p: copy.deepcopy(getattr(model, p)) for p in parts if model.has(p)})
