"""Small random open_clip / reference-SuperCLIP checkpoints, saved as the reference trainer saves them.

The towers are open_clip's own classes (``CLIP``: text tower at the top level; ``CustomTextCLIP``:
under ``text.``, the layout of the reference's SuperCLIP). The reference's head is
``MixClsHead(layers=0)``: ``ln_mlp`` (LayerNorm) then ``text_projection`` (Linear), fed with the mean
of the vision tower's output patch tokens; its IDF buffers are updated as the reference's
``SuperClipLoss.reweight_targets`` does, one global batch per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from openclip_ref import open_clip

VOCAB = 49408  # the CLIP BPE: the imported tokenizer is the real one
WIDTH = 48  # vision width; the head's input
GLOBAL_BATCH = 3  # of the reference run whose IDF buffers build() accumulates: 4 steps, 12 captions

CAPTIONS = [
    "a photo of a red circle",
    "A BLUE square, next to a green star!",
    "two yellow triangles",
    "it's a cat's toy",
    "a photo of 3 dogs",
    "the red square on the left",
]


def model_cfg(quick_gelu: bool) -> dict:
    return {
        "embed_dim": 24,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": WIDTH, "patch_size": 8, "head_width": 24},
        "text_cfg": {"context_length": 77, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 2},
    }


class TextDecoder(nn.Module):
    """The reference's ``MixClsHead`` with ``layers: 0`` (same parameter names)."""

    def __init__(self, width: int = WIDTH, vocab: int = VOCAB):
        super().__init__()
        self.ln_mlp = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, vocab)

    def forward(self, x):
        return self.text_projection(self.ln_mlp(x))


def reference_idf(cap_fq: torch.Tensor, num_samples: torch.Tensor, batch: int) -> torch.Tensor:
    """The reference's IDF weights (``SuperClipLoss.reweight_targets``), (V,)."""
    return torch.log((num_samples + 1.0 / batch) / (cap_fq + 1.0 / batch)).reshape(-1)


def build(custom_text: bool, quick_gelu: bool, superclip: bool, seed: int = 0, batch: int = GLOBAL_BATCH):
    """``(open_clip model, text_decoder or None, {"cap_fq", "num_samples"} or {})``, all random."""
    oc = open_clip()
    torch.manual_seed(seed)
    cls = oc.CustomTextCLIP if custom_text else oc.CLIP
    model = cls(**model_cfg(quick_gelu))
    decoder = TextDecoder() if superclip else None
    with torch.no_grad():
        # every tensor away from its init (LayerNorms 1/0, zero biases), so that no mapping hides
        for p in [*model.parameters(), *(decoder.parameters() if decoder else [])]:
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(3.2)
    buffers = {}
    if superclip:
        cap_fq = torch.zeros(1, VOCAB, dtype=torch.float64)
        num_samples = torch.zeros(1, 1, dtype=torch.float64)
        tokens = oc.tokenize(CAPTIONS * 2)  # 12 captions: 4 steps of a global batch of 3
        for step in tokens.split(batch):
            targets = torch.zeros(batch, VOCAB).scatter_(1, step, 1.0)  # as the reference: padding included
            cap_fq += targets.sum(dim=0, keepdim=True) / batch
            num_samples += 1
        buffers = {"cap_fq": cap_fq, "num_samples": num_samples}
    return model.eval(), decoder, buffers


def save_as_reference(path: Path, model, decoder=None, buffers=None) -> Path:
    """``torch.save`` as the reference trainer does: ``{"epoch", "name", "state_dict": {"module." + k},
    "optimizer"}`` (DDP's prefix, an optimizer state with its step counts)."""
    params = [p for p in model.parameters()][:3]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()  # (changes those weights: the state below is read after it)
    model.zero_grad()
    state = dict(model.state_dict())
    if decoder is not None:
        state |= {f"text_decoder.{k}": v for k, v in decoder.state_dict().items()}
    state |= buffers or {}
    torch.save(
        {"epoch": 3, "name": "superclip-test", "state_dict": {f"module.{k}": v for k, v in state.items()},
         "optimizer": optimizer.state_dict()},
        path,
    )  # fmt: skip
    return path
