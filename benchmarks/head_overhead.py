"""What the vocabulary head costs: SuperCLIP / CLIP training-step time and FLOPs, ViT-B/16 shape.

A step is forward + the losses of ``LitSuperCLIP`` (contrastive; + IDF counting and the
classification loss for SuperCLIP) + backward + AdamW (the module's groups and hyper-parameters).
The two variants share one ``CLIPModel`` (CLIP = the same towers without the head), each with its
own AdamW, and are timed in alternating rounds (``timing.interleaved``).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (``superclip_pl.train.flops``) on the
meta device: matmuls only, forward + backward, so the ratio is the head's
Linear(width -> vocab) against the two towers, as in the paper's FLOPs figure.
"""

from __future__ import annotations

import statistics
import time

import torch
from timing import interleaved, median_ratio
from workloads import (
    CLIP_VOCAB,
    build_model,
    flops_per_step,
    random_batch,
    special_ids,
    step_loss,
    toy_preset,
)

from superclip_pl.losses import DocumentFrequency
from superclip_pl.model import SuperCLIP
from superclip_pl.train.module import param_groups

TARGETS = {
    "step_time_ratio": ("<=", 1.03),
    "fwd_bwd_ratio": None,
    "optimizer_ratio": None,
    "optimizer_share_of_clip_step": None,
    "flops_ratio": None,
    "flops_ratio_vit_l16": None,
}

FULL = dict(preset="ViT-B-16", vocab_size=CLIP_VOCAB, image_size=224, batch=4, rounds=10)
# seconds-long stand-in for tests: same code path, a toy architecture
QUICK = dict(
    preset=toy_preset(patch_size=8),
    vocab_size=512,
    image_size=16,
    batch=2,
    rounds=2,
)


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    vocab, size, batch = cfg["vocab_size"], cfg["image_size"], cfg["batch"]
    torch.manual_seed(0)
    superclip = build_model(cfg["preset"], head=True, vocab_size=vocab, image_size=size)
    clip = SuperCLIP(superclip.config, head=False, clip=superclip.clip)  # the same towers, no head
    data = random_batch(batch, size, vocab)
    ignore = special_ids(vocab)

    parts: dict[str, list[tuple[float, float]]] = {"superclip": [], "clip": []}

    def variant(name: str, model: SuperCLIP, doc_freq: DocumentFrequency | None):
        # the module's optimiser: AdamW, decay on matrices only, paper hyper-parameters
        opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)

        def step() -> float:
            start = time.perf_counter()
            step_loss(model, data, doc_freq, ignore).backward()
            mid = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end = time.perf_counter()
            parts[name].append((mid - start, end - mid))
            return end - start

        return step

    times = interleaved(
        {
            "superclip": variant("superclip", superclip, DocumentFrequency(vocab)),
            "clip": variant("clip", clip, None),
        },
        rounds=cfg["rounds"],
    )
    # drop the warm-up round's parts so they line up with ``times``
    fwd_bwd = {n: [p[0] for p in v[-cfg["rounds"] :]] for n, v in parts.items()}
    optim = {n: [p[1] for p in v[-cfg["rounds"] :]] for n, v in parts.items()}
    flops = {h: flops_per_step(cfg["preset"], vocab, size, batch, h) for h in (True, False)}
    out = {
        "step_time_ratio": median_ratio(times, "superclip", "clip"),
        "fwd_bwd_ratio": median_ratio(fwd_bwd, "superclip", "clip"),
        "optimizer_ratio": median_ratio(optim, "superclip", "clip"),
        "flops_ratio": flops[True] / flops[False],
        "superclip_step_s": times["superclip"],
        "clip_step_s": times["clip"],
        "superclip_gflops_per_step": flops[True] / 1e9,
        "clip_gflops_per_step": flops[False] / 1e9,
        "head_params_m": sum(p.numel() for p in superclip.head.parameters()) / 1e6,
        "clip_params_m": sum(p.numel() for p in clip.parameters()) / 1e6,
        # how much of a CLIP step is the optimizer: the head's 38M parameters weigh on this part
        "optimizer_share_of_clip_step": statistics.median(
            o / t for o, t in zip(optim["clip"], times["clip"], strict=True)
        ),
        "config": {k: v for k, v in cfg.items() if k != "preset"}
        | {"preset": "quick" if quick else cfg["preset"]},
    }
    # the paper's FLOPs figure is for ViT-L/16 (+0.077%); counting on the meta device costs seconds
    l16 = {h: flops_per_step("ViT-L-16", CLIP_VOCAB, 224, 1, h) for h in (True, False)}
    out["flops_ratio_vit_l16"] = l16[True] / l16[False]
    return out
