"""``superclip export`` and ``superclip import``: their argument parsers, built without importing
torch or transformers (so that ``--help`` answers at once), and their runs. Errors propagate to
``superclip_pl.cli.main.main``, which prints them in one line with exit status 2."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")  # superclip_pl.interop.export.DTYPES
FORMATS = ("hf", "open_clip")  # superclip_pl.interop.export.FORMATS
WEIGHTS = ("averaged", "raw")  # superclip_pl.interop.export.WEIGHTS
HEAD_POOLING = ("all_patches", "skip_first_patch")  # superclip_pl.model.HEAD_POOLING
PAPER_BATCH = 16384  # superclip_pl.interop.importer.PAPER_BATCH (kept equal by a test)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip export",
        description=(
            "Export a SuperCLIP checkpoint as a transformers CLIPModel directory (safetensors weights "
            "without the training-only vocabulary head, config.json, tokenizer, image processor, "
            "model card) that transformers.pipeline('zero-shot-image-classification', model=DIR) "
            "and CLIPModel.from_pretrained(DIR) load offline, and that `backbone: DIR` fine-tunes from."
        ),
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning .ckpt file of LitSuperCLIP, or the checkpoint directory of an FSDP2 run",
    )
    parser.add_argument("--output_dir", required=True, help="directory to write (must be new or empty)")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or hub id, if the one recorded in the checkpoint has moved",
    )
    parser.add_argument(
        "--format",
        default="hf",
        choices=FORMATS,
        help="hf: a transformers CLIPModel directory (default); open_clip: open_clip_config.json + "
        "open_clip_model.safetensors (+ the head as text_decoder.safetensors) for "
        "open_clip.create_model_and_transforms('local-dir:DIR'); --ckpt_path may then be an HF "
        "directory of ours (superclip export / import)",
    )
    parser.add_argument(
        "--idf_batch_size",
        type=int,
        default=None,
        help="open_clip format: global batch size the reference's cap_fq/num_samples are written at",
    )
    parser.add_argument(
        "--weights",
        default="averaged",
        choices=WEIGHTS,
        help="a checkpoint of a run with the EMA callback: its averaged weights (default) or the raw ones",
    )
    return parser


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip import",
        description=(
            "Import an open_clip or reference SuperCLIP checkpoint as a transformers CLIPModel directory "
            "that `superclip fit --model.backbone DIR` fine-tunes from (with the SuperCLIP head and its "
            "IDF counts), `superclip export` and transformers.pipeline load."
        ),
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="checkpoint file (.pt/.bin/.safetensors), open_clip directory, hub ORG/REPO or ORG/REPO/FILE",
    )
    parser.add_argument("--output_dir", required=True, help="directory to write (must be new or empty)")
    parser.add_argument(
        "--model_config",
        default=None,
        help="open_clip model config: JSON file or a name (SuperCLIP-ViT-B-16, ViT-B-16-quickgelu, ...); "
        "default: open_clip_config.json beside the weights, else read from the tensors' shapes (GELU)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir, hub id or bpe_simple_vocab_16e6.txt.gz (default: open_clip_torch's CLIP BPE)",
    )
    parser.add_argument(
        "--idf_batch_size",
        type=int,
        default=None,
        help=f"the run's global batch size, to turn cap_fq/num_samples into counts (default {PAPER_BATCH})",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    parser.add_argument(
        "--head_pooling",
        default=None,
        choices=HEAD_POOLING,
        help="what the head averages, recorded for fine-tuning: all_patches, or skip_first_patch (patches "
        "2..P: the reference before its commit bc640a6, likely the released checkpoints'); default: what "
        "the checkpoint's open_clip_config.json records, else all_patches",
    )
    return parser


def run_export(argv: list[str]) -> Path:
    """``superclip export ARGV``: the directory written."""
    args = export_parser().parse_args(argv)
    from superclip_pl.interop.export import export_checkpoint

    out = export_checkpoint(
        args.ckpt_path,
        args.output_dir,
        args.dtype,
        args.overwrite,
        args.tokenizer,
        args.format,
        args.idf_batch_size,
        args.weights,
    )
    print(f"exported {args.ckpt_path} to {out}")
    return out


def run_import(argv: list[str]) -> Path:
    """``superclip import ARGV``: the directory written."""
    args = import_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from superclip_pl.interop.importer import import_checkpoint

    out = import_checkpoint(
        args.ckpt_path,
        args.output_dir,
        args.model_config,
        args.tokenizer,
        args.idf_batch_size,
        args.overwrite,
        args.head_pooling,
    )
    print(f"imported {args.ckpt_path} to {out}")
    return out
