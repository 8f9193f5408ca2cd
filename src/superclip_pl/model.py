"""SuperCLIP as a plain ``nn.Module``: an HF ``CLIPModel`` plus the vocabulary classifier head.

No Lightning here: the model works for inference, tests and export without a Trainer.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from superclip_pl.head_file import HEAD_POOLING, read_extras, read_head_pooling
from superclip_pl.patch_dropout import PatchDropout
from superclip_pl.presets import PRESETS
from superclip_pl.resolution import resize_image_tower

MAX_LOGIT_SCALE = math.log(100.0)


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def clip_config(
    preset: str | dict[str, Any], tokenizer=None, image_size: int | None = None, overrides: dict | None = None
) -> CLIPConfig:
    """A ``CLIPConfig`` from a preset name or a config dict, sized to ``tokenizer`` (vocab, special ids)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or a pretrained dir"
            )
        preset = PRESETS[preset]
    cfg = _merge(preset, overrides or {})
    if image_size is not None:
        cfg["vision_config"]["image_size"] = image_size
    if tokenizer is not None:
        # a vocab_size the user set (e.g. padded to a multiple of 64) is kept if it holds the tokenizer
        vocab = (overrides or {}).get("text_config", {}).get("vocab_size") or len(tokenizer)
        if vocab < len(tokenizer):
            raise ValueError(
                f"backbone_config.text_config.vocab_size={vocab} is less than the tokenizer's "
                f"{len(tokenizer)} tokens: drop it (it is then the tokenizer's) or raise it"
            )
        cfg["text_config"].update(
            vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return CLIPConfig(**cfg)


def check_tokenizer(config: CLIPConfig, tokenizer) -> None:
    """Fail with one clear line when ``tokenizer`` does not fit the text tower of ``config``."""
    tc = config.text_config
    if len(tokenizer) > tc.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is {tc.vocab_size}: "
            "use the model's own tokenizer, or drop or raise backbone_config.text_config.vocab_size"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: CLIP pools the text at the end-of-text token")
    if tc.eos_token_id is None:
        raise ValueError("text config has no eos_token_id: set it from the tokenizer (text pooling needs it)")
    # HF keeps eos_token_id == 2 for old checkpoints and then pools at argmax(input_ids): right only when
    # the tokenizer's end-of-text token has the largest id (true of the OpenAI CLIP tokenizer).
    legacy_ok = tc.eos_token_id == 2 and tokenizer.eos_token_id == len(tokenizer) - 1
    if tc.eos_token_id != tokenizer.eos_token_id and not legacy_ok:
        raise ValueError(
            f"text config eos_token_id={tc.eos_token_id} but the tokenizer's eos_token_id="
            f"{tokenizer.eos_token_id}: text pooling would pick the wrong token"
        )


class VocabularyHead(nn.Module):
    """LayerNorm + Linear over the vocabulary, fed with the mean of the post-LayerNorm patch tokens."""

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, vocab_size)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patch_mean: torch.Tensor) -> torch.Tensor:  # (B, W) -> (B, V)
        return self.proj(self.norm(patch_mean))


class SuperCLIP(nn.Module):
    """An HF ``CLIPModel`` with the SuperCLIP vocabulary head on its vision tower.

    Args:
        config: the ``CLIPConfig`` of the two towers; the head predicts ``text_config.vocab_size`` classes.
        head: build the vocabulary head (``False`` gives plain CLIP: nothing is spent on it).
        siglip: add the learnable logit bias of the sigmoid loss and start the scale at log(10).
        head_pooling: what the head averages: ``all_patches`` (every patch token, the reference since
            its commit bc640a6) or ``skip_first_patch`` (patches 2..P, the reference before that commit,
            which the released checkpoints were trained with).
        patch_dropout: fraction of each image's patches dropped in training mode (FLIP); None: the vision
            config's ``patch_dropout`` (as open_clip's ``vision_cfg`` has it), else 0.
    """

    def __init__(
        self,
        config: CLIPConfig,
        head: bool = True,
        siglip: bool = False,
        clip: CLIPModel | None = None,
        head_pooling: str = "all_patches",
        patch_dropout: float | None = None,
    ):
        super().__init__()
        if head_pooling not in HEAD_POOLING:
            raise ValueError(f"head_pooling={head_pooling!r} is not one of {list(HEAD_POOLING)}")
        self.head_pooling = head_pooling
        self.clip = clip if clip is not None else CLIPModel(config)
        self.config = self.clip.config
        vision = self.config.vision_config
        if patch_dropout is None:
            patch_dropout = getattr(vision, "patch_dropout", 0.0)
        self.patch_dropout = PatchDropout(patch_dropout)
        self.patch_dropout.attach(self.clip.vision_model.embeddings)
        if patch_dropout or hasattr(vision, "patch_dropout"):  # kept in the config: FLOPs, open_clip export
            vision.patch_dropout = patch_dropout
        width = self.config.vision_config.hidden_size
        eps = self.config.vision_config.layer_norm_eps
        self.head = VocabularyHead(width, self.config.text_config.vocab_size, eps) if head else None
        # scalars are held as shape (1,): FSDP2 shards along dim 0 and refuses 0-d parameters, and one
        # shape under every strategy keeps checkpoints interchangeable (export writes HF's 0-d back)
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0)) if siglip else None
        if siglip and clip is None:
            with torch.no_grad():
                self.clip.logit_scale.fill_(math.log(10.0))

    @classmethod
    def build(
        cls,
        backbone: str = "tiny",
        tokenizer=None,
        image_size: int | None = None,
        overrides: dict | None = None,
        head: bool = True,
        siglip: bool = False,
        head_pooling: str | None = None,
        patch_dropout: float | None = None,
    ) -> SuperCLIP:
        """A model from a preset name (fresh weights) or a pretrained HF CLIP (local dir or hub id); a
        pretrained one at another ``image_size`` gets its position embeddings resampled to it."""
        if backbone in PRESETS:
            config = clip_config(backbone, tokenizer, image_size, overrides)
            model = cls(
                config,
                head=head,
                siglip=siglip,
                head_pooling=head_pooling or "all_patches",
                patch_dropout=patch_dropout,
            )
        else:
            model = cls.from_pretrained(
                backbone, head=head, siglip=siglip, head_pooling=head_pooling, patch_dropout=patch_dropout
            )
            if image_size is not None and image_size != model.image_size:
                resize_image_tower(model.clip, image_size)
            if overrides:
                raise ValueError("overrides apply to presets only; a pretrained model keeps its own config")
        if tokenizer is not None:
            check_tokenizer(model.config, tokenizer)
        return model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        head: bool = True,
        siglip: bool = False,
        head_pooling: str | None = None,
        patch_dropout: float | None = None,
    ) -> SuperCLIP:
        """Start from a pretrained HF ``CLIPModel`` (hub id or local dir); the head is the directory's
        ``superclip_head.safetensors`` (``superclip import`` of a SuperCLIP checkpoint) or fresh, pooled as
        ``head_pooling`` or, when None, as that file records (else ``all_patches``); ``patch_dropout``
        None keeps the one in the directory's config (an imported open_clip model's)."""
        try:
            # float32 master weights whatever the saved dtype (autocast handles bf16); HF returns the
            # model in eval mode, and fine-tuning wants dropout etc. as configured
            clip = CLIPModel.from_pretrained(name_or_path, dtype=torch.float32).train()
        except OSError as err:
            where = "local directory" if os.path.isdir(name_or_path) else "preset name or hub id"
            raise ValueError(
                f"cannot load a CLIP model from {name_or_path!r} ({where}): {str(err).splitlines()[0]}; "
                f"presets are {sorted(PRESETS)}"
            ) from None
        head_pooling = head_pooling or read_head_pooling(name_or_path) or "all_patches"
        model = cls(
            clip.config,
            head=head,
            siglip=siglip,
            clip=clip,
            head_pooling=head_pooling,
            patch_dropout=patch_dropout,
        )
        state = read_extras(name_or_path)[0] if head else None
        if state is not None:
            want = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in state.items()}
            if got != want:
                raise ValueError(
                    f"{name_or_path!r}: the head in superclip_head.safetensors has shapes {got}, the model's "
                    f"head {want}; re-run `superclip import` into a new directory"
                )
            model.head.load_state_dict({k: v.float() for k, v in state.items()})
        return model

    @classmethod
    def from_open_clip(
        cls,
        ckpt_path: str,
        model_config: str | dict | None = None,
        tokenizer: str | None = None,
        head: bool = True,
    ) -> SuperCLIP:
        """A model from an open_clip or reference SuperCLIP checkpoint (file, directory or hub id, as
        ``superclip import`` reads them), with the checkpoint's head or a fresh one. The IDF counts are
        in ``superclip_pl.interop.importer.read_open_clip(...).doc_freq``."""
        from superclip_pl.interop.importer import read_open_clip

        imp = read_open_clip(ckpt_path, model_config, tokenizer)
        clip = CLIPModel(imp.config)
        clip.load_state_dict(imp.weights)
        model = cls(imp.config, head=head, clip=clip)
        if head and imp.head is not None:
            model.head.load_state_dict(imp.head)
        return model

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def vocab_size(self) -> int:
        return self.config.text_config.vocab_size

    def logit_scale(self) -> torch.Tensor:
        """exp(logit scale) as a 0-d tensor. Training keeps the parameter in [0, log(100)] by clamping it
        in place after every optimizer step (``superclip_pl.train.optim.clamp_logit_scale``), as the reference
        does; a clamp here would zero its gradient once past the bound, so it could never come back."""
        return self.clip.logit_scale.exp().sum()  # (1,) -> 0-d, not a view

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, E): projection of the post-LayerNorm CLS token."""
        return F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings (B, E): projection of the end-of-text token's state."""
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out.pooler_output, dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Named outputs: ``image_embeds``, ``text_embeds`` (normalised; None when ``input_ids`` is None:
        the text tower does not run), ``logit_scale``, ``logit_bias`` (SigLIP only) and ``vocab_logits``
        (B, V) (None without a head)."""
        vision = self.clip.get_image_features(pixel_values=pixel_values)
        text = None
        if input_ids is not None:
            text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        vocab_logits = None
        if self.head is not None:
            # patch tokens only (CLS excluded), after the tower's final LayerNorm: (B, 1 + P, W) -> (B, W);
            # with patch dropout in training, the P kept ones (the reference averages what its tower returns)
            first = HEAD_POOLING[self.head_pooling]
            patches = self.clip.vision_model.post_layernorm(vision.last_hidden_state[:, first:])
            vocab_logits = self.head(patches.mean(dim=1))
        return {
            "image_embeds": F.normalize(vision.pooler_output, dim=-1),
            "text_embeds": None if text is None else F.normalize(text.pooler_output, dim=-1),
            "logit_scale": self.logit_scale(),
            "logit_bias": None if self.logit_bias is None else self.logit_bias.sum(),
            "vocab_logits": vocab_logits,
        }
