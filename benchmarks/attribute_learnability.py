"""How fast the vision tower can learn one attribute when it is told it directly.

    python benchmarks/attribute_learnability.py [--attribute shape] [--steps 2500] [--eval-every 500]

An upper bound for what contrastive or SuperCLIP training can reach in the same number of steps:
the demo's vision tower (``tiny`` preset) and a head of the SuperCLIP head's form (LayerNorm + Linear
on the post-LayerNorm patch-token mean) are trained with a multi-label loss on which values of the
attribute are present (shape: the shapes in the scene; colour: the colours; count: the object count,
one label), on freshly drawn training scenes (the demo's distribution and training crop), with the
demo's optimiser and schedule. Every ``eval-every`` steps it reports top-1 on the single-object
evaluation set of that attribute (``data/shapes/eval/<attribute>``, from ``make data``).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from superclip_pl.eval.sets import load_classification_set
from superclip_pl.model import SuperCLIP
from superclip_pl.module import param_groups, warmup_cosine
from superclip_pl.shapes.scenes import COLOURS, SHAPES, render_scene, sample_scene
from superclip_pl.transforms import eval_transform, train_transform

CLASSES = {"shape": SHAPES, "colour": COLOURS, "count": ("one", "two", "three")}


def targets(scene: dict, attribute: str) -> torch.Tensor:
    """Multi-hot vector of the attribute's values present in ``scene``."""
    y = torch.zeros(len(CLASSES[attribute]))
    if attribute == "count":
        y[len(scene["objects"]) - 1] = 1
    else:
        for obj in scene["objects"]:
            y[CLASSES[attribute].index(obj[attribute])] = 1
    return y


def run(
    attribute: str = "shape",
    steps: int = 2500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.2,
    warmup: int = 100,
    eval_every: int = 500,
    eval_root: str | None = None,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vision = SuperCLIP.build("tiny", head=False).clip.vision_model
    width, size = vision.config.hidden_size, vision.config.image_size
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(CLASSES[attribute])))
    groups = param_groups(nn.ModuleList([vision, head]), weight_decay)  # the demo's decay / no-decay split
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps, 0.0))
    augment = train_transform(size)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        tokens = vision(pixel_values=pixels).last_hidden_state[:, 1:]
        return head(vision.post_layernorm(tokens).mean(1))

    evalset = list(load_classification_set(eval_root or f"data/shapes/eval/{attribute}"))
    to_tensor = eval_transform(size)
    eval_pixels = torch.stack([to_tensor(s.image) for s in evalset])
    eval_labels = torch.tensor([s.label for s in evalset])

    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        pixels = torch.stack([augment(render_scene(s, size)) for s in scenes])
        labels = torch.stack([targets(s, attribute) for s in scenes])
        loss = F.binary_cross_entropy_with_logits(logits(pixels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            vision.eval()
            with torch.no_grad():
                top1 = (logits(eval_pixels).argmax(1) == eval_labels).float().mean().item()
            vision.train()
            curve.append({"step": step, "loss": loss.item(), "top1": top1})
            print(
                f"step {step:6d}  loss {loss.item():.3f}  {attribute} top-1 {top1:.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return {
        "attribute": attribute,
        "chance": 1 / len(CLASSES[attribute]),
        "batch_size": batch_size,
        "lr": lr,
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attribute", choices=sorted(CLASSES), default="shape")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-root", help="evaluation set (default: data/shapes/eval/<attribute>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(
        args.attribute,
        args.steps,
        args.batch_size,
        args.lr,
        eval_every=args.eval_every,
        eval_root=args.eval_root,
        seed=args.seed,
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
