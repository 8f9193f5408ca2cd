"""The backbone presets `model.backbone` names: the paper's architectures and a tiny one."""

from __future__ import annotations

from typing import Any

# Architectures of the paper (open_clip ViT-B-16 / ViT-L-16 shapes), plus a tiny one for tests and
# the CPU demo. ``vocab_size`` and the special-token ids are taken from the tokenizer, never from here.
# Trained from scratch with standard GELU (open_clip's non-OpenAI models); HF's default is quick_gelu.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "projection_dim": 128,
        "vision_config": dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            image_size=64,
            patch_size=8,
            hidden_act="gelu",
        ),
        "text_config": dict(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
    },
    "ViT-B-16": {
        "projection_dim": 512,
        "vision_config": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
            hidden_act="gelu",
        ),
        "text_config": dict(
            hidden_size=512,
            num_hidden_layers=12,
            num_attention_heads=8,
            intermediate_size=2048,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
    },
    "ViT-L-16": {
        "projection_dim": 768,
        "vision_config": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=224,
            patch_size=16,
            hidden_act="gelu",
        ),
        "text_config": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
    },
}
