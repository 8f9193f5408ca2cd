"""What patch dropout (FLIP) saves: SuperCLIP training-step time at ``patch_dropout`` 0.5 and 0.75 against
0, ViT-B/16 shape at 224 px (196 patches: 98 and 49 kept), and the model FLOPs of each.

A step is forward + the losses of ``LitSuperCLIP`` (contrastive; IDF counting and the classification
loss) + backward + AdamW, as in ``head_overhead``. One model and one optimizer; the variants differ only
in ``model.patch_dropout.prob`` and are timed in alternating rounds (``timing.interleaved``). The text
tower, the head, the patch embedding and AdamW cost the same in every variant, so the step ratios sit
above the vision encoder's token ratio (99/197 and 50/197).
"""

from __future__ import annotations

import time

import torch
from timing import interleaved, median_ratio
from workloads import CLIP_VOCAB, random_batch, special_ids, step_loss, toy_preset, vocab_config

from superclip_pl.losses import DocumentFrequency
from superclip_pl.model import SuperCLIP
from superclip_pl.train.flops import training_step_flops
from superclip_pl.train.module import param_groups

RATES = {"p50": 0.5, "p75": 0.75}
TARGETS = {
    "step_time_ratio_p50": ("<=", 0.60),
    "step_time_ratio_p75": ("<=", 0.40),
    "fwd_bwd_ratio_p50": None,
    "fwd_bwd_ratio_p75": None,
    "flops_ratio_p50": None,
    "flops_ratio_p75": None,
}

FULL = dict(preset="ViT-B-16", vocab_size=CLIP_VOCAB, image_size=224, batch=4, rounds=5, context=77)
# seconds-long stand-in for tests: same code path, a toy architecture (16 patches of 4 px)
QUICK = dict(
    preset=toy_preset(patch_size=4),
    vocab_size=512,
    image_size=16,
    batch=2,
    rounds=2,
    context=16,
)


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    vocab, size, batch = cfg["vocab_size"], cfg["image_size"], cfg["batch"]
    torch.manual_seed(0)
    model = SuperCLIP(vocab_config(cfg["preset"], vocab, size), head=True)
    data = random_batch(batch, size, vocab, length=cfg["context"])
    ignore, doc_freq = special_ids(vocab), DocumentFrequency(vocab)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    fwd_bwd: dict[str, list[float]] = {}

    def variant(name: str, prob: float):
        def step() -> float:
            model.patch_dropout.prob = prob
            start = time.perf_counter()
            step_loss(model, data, doc_freq, ignore).backward()
            fwd_bwd.setdefault(name, []).append(time.perf_counter() - start)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        return step

    variants = {"p0": variant("p0", 0.0)} | {k: variant(k, p) for k, p in RATES.items()}
    times = interleaved(variants, rounds=cfg["rounds"])
    fwd_bwd = {n: v[-cfg["rounds"] :] for n, v in fwd_bwd.items()}  # without the warm-up round

    def flops(prob: float) -> int:
        config = vocab_config(cfg["preset"], vocab, size)
        config.vision_config.patch_dropout = prob
        return training_step_flops(config, True, batch, cfg["context"])

    counted = {"p0": flops(0.0)} | {k: flops(p) for k, p in RATES.items()}
    out: dict = {f"step_time_ratio_{k}": median_ratio(times, k, "p0") for k in RATES}
    out |= {f"fwd_bwd_ratio_{k}": median_ratio(fwd_bwd, k, "p0") for k in RATES}
    out |= {f"flops_ratio_{k}": counted[k] / counted["p0"] for k in RATES}
    out |= {f"step_s_{k}": times[k] for k in times} | {
        f"gflops_per_step_{k}": counted[k] / 1e9 for k in counted
    }
    out["config"] = {k: v for k, v in cfg.items() if k != "preset"} | {
        "preset": "quick" if quick else cfg["preset"]
    }
    return out
