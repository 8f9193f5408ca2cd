"""GPU check: ViT-B/16 training throughput and MFU of CLIP and SuperCLIP, eager and compiled, plus
one FSDP2 step, on one CUDA device; prints a table and writes ``outputs/gpu_check/results.json``.

    python benchmarks/gpu_check.py             # on a CUDA machine (about 5 minutes, capped at 8)
    python benchmarks/gpu_check.py --dry-run   # the same code on the CPU with a toy model (seconds)

Every variant is ``LitSuperCLIP`` under a Lightning ``Trainer`` with ``precision="bf16-mixed"``, the
CLIP vocabulary (49408, a word-level tokenizer made here: only its size matters) and one batch of
random 224 px images and 77-token captions kept on the device (the input pipeline is not measured).
CLIP is ``class_loss_weight=0`` (no head is built), SuperCLIP ``1``. Compiled = ``model.compile()``
on the ``SuperCLIP`` module (the losses stay eager).
samples/s = batch x measured steps / their wall time (CUDA synchronised at both ends only).
MFU = model FLOPs per step x steps/s / the device's dense bf16 peak. Model FLOPs: forward + backward
of the step, counted by FlopCounterMode on the meta device (``superclip_pl.train.flops``).
The FSDP2 step: ``ModelParallelStrategy`` (data_parallel_size=1) runs ``configure_model``'s
``fully_shard``; it must give a finite loss.
Without CUDA (and without ``--dry-run``) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

OUTPUT = Path(__file__).resolve().parent.parent / "outputs" / "gpu_check" / "results.json"
FULL = dict(
    backbone="ViT-B-16",
    backbone_config=None,
    vocab_size=49408,
    image_size=224,
    batch=256,
    warmup=5,
    steps=20,
    compile_warmup=3,
    compile_backend="inductor",
)
# the CPU stand-in: same code paths, a toy model; "eager" compile runs Dynamo without code generation
DRY = dict(
    backbone="tiny",
    backbone_config={"vision_config": {"num_hidden_layers": 1}, "text_config": {"num_hidden_layers": 1}},
    vocab_size=512,
    image_size=32,
    batch=4,
    warmup=1,
    steps=2,
    compile_warmup=1,
    compile_backend="eager",
)
COMPILE_GUESS_S, FSDP_RESERVE_S = 150.0, 60.0
# dense (not sparse) bf16 tensor-core peaks, FLOP/s; first match on the lower-cased device name wins
PEAK_BF16 = [
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h200 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, torch.bfloat16)  # Lightning's table (sparse figures for some chips)


def make_trainer(device: torch.device, max_steps: int, callbacks: list, strategy="auto"):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=device.type,
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def make_clock(device: torch.device, start_step: int, last_step: int):
    """A callback that times steps ``start_step + 1 .. last_step`` and keeps the last step's loss."""
    from lightning.pytorch import Callback

    class Clock(Callback):
        def __init__(self):
            self.marks: dict[int, float] = {}
            self.loss = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx in (start_step, last_step):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # only here: syncing every step would stall the queue
                self.marks[batch_idx] = time.perf_counter()
            if batch_idx == last_step:
                self.loss = float(outputs["loss"])

    return Clock()


def loader(cfg: dict, device: torch.device, steps: int):
    from torch.utils.data import DataLoader
    from workloads import Batches, random_batch

    batch = {
        k: v.to(device) for k, v in random_batch(cfg["batch"], cfg["image_size"], cfg["vocab_size"]).items()
    }
    return DataLoader(Batches([batch] * steps), batch_size=None)


def module(cfg: dict, tokenizer_dir: str, weight: float):
    from superclip_pl.train.module import LitSuperCLIP

    torch.manual_seed(0)
    return LitSuperCLIP(
        tokenizer_dir,
        backbone=cfg["backbone"],
        backbone_config=cfg["backbone_config"],
        image_size=cfg["image_size"],
        class_loss_weight=weight,
        warmup_steps=10,
    )


def throughput(cfg: dict, tokenizer_dir: str, device: torch.device, weight: float, compiled: bool) -> dict:
    lit = module(cfg, tokenizer_dir, weight)
    if compiled:
        lit.model.compile(backend=cfg["compile_backend"])
    warmup = cfg["compile_warmup"] if compiled else cfg["warmup"]
    total = warmup + cfg["steps"]
    clock = make_clock(device, warmup - 1, total - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    make_trainer(device, total, [clock]).fit(lit, loader(cfg, device, total))
    seconds = clock.marks[total - 1] - clock.marks[warmup - 1]
    out = {"samples_per_s": cfg["batch"] * cfg["steps"] / seconds, "loss": clock.loss}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def fsdp_step(cfg: dict, tokenizer_dir: str, device: torch.device) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule

    lit = module(cfg, tokenizer_dir, 1.0)
    clock = make_clock(device, 0, 0)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    make_trainer(device, 1, [clock], strategy).fit(lit, loader(cfg, device, 1))
    return {"loss": clock.loss, "sharded": isinstance(lit.model, FSDPModule)}


def free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(rows: list[dict]) -> None:
    keys = ("samples_per_s", "tflops", "mfu", "peak_memory_gib", "loss", "seconds")
    heads = ("samples/s", "TFLOP/s", "MFU", "mem GiB", "loss", "time s")
    digits = (1, 1, 3, 1, 4, 0)
    print(f"\n{'variant':<24}" + "".join(f" {h:>9}" for h in heads) + "  note")
    for r in rows:
        cells = ["-" if r.get(k) is None else f"{r[k]:.{d}f}" for k, d in zip(keys, digits, strict=True)]
        print(f"{r['variant']:<24}" + "".join(f" {c:>9}" for c in cells) + f"  {r.get('note', '')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="toy model on the CPU: checks the code, no figures"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="skip a compiled variant unless it is expected to end, FSDP step included, within this",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (run it on a GPU machine; --dry-run checks the code)")
        return 0

    import logging

    import lightning.pytorch  # noqa: F401  (its loggers exist from here on)
    from workloads import flops_per_step, word_tokenizer

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")
    cfg = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    peak = peak_flops(device)
    start, rows = time.perf_counter(), []
    # a compiled variant is expected to take as long as the last one did (compilation dominates), at
    # least COMPILE_GUESS_S; the FSDP step, which must run, gets FSDP_RESERVE_S
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = word_tokenizer(cfg["vocab_size"], tmp)
        for compiled in (False, True):
            for name, weight in (("clip", 0.0), ("superclip", 1.0)):
                row = {"variant": f"{name}{' compiled' if compiled else ''}", "class_loss_weight": weight}
                rows.append(row)
                if compiled:
                    done = [r["seconds"] for r in rows if "compiled" in r["variant"] and "seconds" in r]
                    expected = max([COMPILE_GUESS_S, *done])
                    if time.perf_counter() - start + expected + FSDP_RESERVE_S > args.budget_s:
                        row["note"] = f"skipped: would end past the {args.budget_s:.0f} s budget"
                        continue
                flops = flops_per_step(
                    cfg["backbone"],
                    cfg["vocab_size"],
                    cfg["image_size"],
                    cfg["batch"],
                    weight > 0,
                    cfg["backbone_config"],
                )
                began = time.perf_counter()
                try:
                    row |= throughput(cfg, tokenizer_dir, device, weight, compiled)
                except Exception as err:  # report it and go on: the other variants still say something
                    row["error"] = row["note"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                    continue
                finally:
                    free(device)
                    row["seconds"] = time.perf_counter() - began  # build + compile + all steps
                row["model_gflops_per_step"] = flops / 1e9
                row["tflops"] = flops * row["samples_per_s"] / cfg["batch"] / 1e12
                row["mfu"] = None if peak is None else row["tflops"] * 1e12 / peak
        row = {"variant": "superclip fsdp2 1 step"}
        rows.append(row)
        began = time.perf_counter()
        try:
            row |= fsdp_step(cfg, tokenizer_dir, device)
            row["seconds"] = time.perf_counter() - began
            row["note"] = "finite loss" if math.isfinite(row["loss"]) else "NON-FINITE LOSS"
        except Exception as err:
            row["error"] = row["note"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    wall = time.perf_counter() - start

    print_table(rows)
    report = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "config": cfg,
        "wall_s": wall,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['device']}, peak {peak or 0:.3g} FLOP/s, {wall:.0f} s; wrote {args.output}")
    failed = any("error" in r for r in rows) or not math.isfinite(rows[-1].get("loss", float("nan")))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
