"""``SuperCLIPCLI``: the LightningCLI behind ``superclip fit|validate|test``.

Besides LightningCLI's parsing it links the data module and the model, checks what can be checked before
anything is built (the data module's sizes, paths and tokenizer, the checkpoint), resumes into the run's
own log directory (``--ckpt_path last``: its newest ``last.ckpt``), stops on SIGTERM / SIGINT with a
checkpoint, writes checkpoints atomically, names the checkpoint's step in validate / test, and after each
run writes ``metrics.json`` (and ``results.md`` / ``.csv``) into the log directory.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from superclip_pl.cli.autoresume import find_last, resume_version
from superclip_pl.cli.checks import check_ckpt_path, check_data
from superclip_pl.cli.run_end import RunEnd
from superclip_pl.cli.sources import whole_sources
from superclip_pl.data import ImageTextDataModule
from superclip_pl.errors import UserError
from superclip_pl.eval.embeddings import EmbeddingWriter
from superclip_pl.train.checkpoint_io import use_atomic_checkpoints
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.train.progress import StepProgressBar
from superclip_pl.train.resume import Resume
from superclip_pl.train.signals import GracefulStop

SCHEDULE_KEYS = ("lr_schedule", "cooldown_steps", "cooldown_power")  # a resumed fit: the command's
DESCRIPTION = "Train and evaluate SuperCLIP models (CLIP + vocabulary classifier)."
WHAT = {
    "fit": "Train a model; --ckpt_path CKPT resumes a run (into its own log directory).",
    "validate": "Evaluate --ckpt_path CKPT on data.val and the evaluation callbacks (writes metrics.json).",
    "test": "Evaluate --ckpt_path CKPT on data.test and the evaluation callbacks (writes metrics.json).",
    "predict": "Embed data.predict's images and captions with --ckpt_path CKPT: one safetensors file of "
    "image_embeds / text_embeds (+ a keys file) per rank, in <log_dir>/embeddings (superclip_pl."
    "EmbeddingWriter; --return_predictions false keeps them out of memory).",
}
MORE = (
    " The data module's own options: superclip {0} --data.help superclip_pl.ImageTextDataModule;"
    " a data source's fields: path, data_files, split, name, weight, config_name, data_dir, revision,"
    " image_column, text_column, separator, storage_options (README, Configs). Every value of a config:"
    " superclip {0} --config FILE --print_config."
)


def parser_kwargs() -> dict:
    """The usage line and description of each subcommand (the usage alone would list ~60 lines)."""
    kwargs: dict = {"description": DESCRIPTION}
    for name, what in WHAT.items():
        kwargs[name] = {
            "usage": f"superclip {name} [-h] [-c CONFIG] [--print_config] [--KEY VALUE ...]",
            "description": what + MORE.format(name),
        }
    return kwargs


class OneLineErrors(LightningArgumentParser):
    """A usage error (unknown option, bad type, missing config file) in one line, not a 60-line usage."""

    def error(self, message: str, ex: Exception | None = None):
        if os.environ.get("SUPERCLIP_TRACEBACK") == "1" or not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = " ".join(message.split())
        text = text if len(text) <= 400 else text[:400] + " ..."
        sys.stderr.write(f"{prog}: error: {text} (see {prog} --help)\n")
        sys.exit(2)


class SuperCLIPCLI(RunEnd, LightningCLI):
    """LightningCLI with the links between the data and the model, the checks before anything is built,
    and ``metrics.json`` after each run (``RunEnd``)."""

    checkpoint_step: int | None = None  # global step of --ckpt_path, read by the checks

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("prog", "superclip")
        return super().init_parser(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters with torch.load first: check it before
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            self.config[subcommand].ckpt_path = _last(self.config[subcommand].trainer, subcommand)
        if subcommand and (ckpt_path := self.config[subcommand].get("ckpt_path")):
            self.checkpoint_step = check_ckpt_path(ckpt_path)
        # the checkpoint's hyperparameters replace the command's; the schedule's stay the command's, so
        # that a run resumed with a later max_steps can be cooled down (lr_schedule constant_cooldown)
        model = self.config[subcommand].get("model") if subcommand == "fit" else None
        asked = {k: model.get(k) for k in SCHEDULE_KEYS} if model is not None else {}
        # and a patch dropout given for the resumed run stands: resuming a masked run with 0 is FLIP's
        # unmasked tuning
        if model is not None and model.get("patch_dropout") is not None:
            asked["patch_dropout"] = model.get("patch_dropout")
        super()._parse_ckpt_path()
        for key, value in asked.items():
            self.config[subcommand].model[key] = value

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """LightningCLI's, except that a whole data source given on the command line replaces the
        config's instead of merging into it (``cli/sources.py``)."""
        if args is None or isinstance(args, list):
            self.config = parser.parse_args(whole_sources(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer and one caption length feed both the data pipeline and the model
        parser.link_arguments("data.init_args.tokenizer", "model.tokenizer")
        parser.link_arguments("data.init_args.max_length", "model.max_length", compute_fn=_clip_length)
        # the classification targets are cut in the data workers, at the model's class_max_length
        parser.link_arguments("model.class_max_length", "data.init_args.class_max_length")
        # the backbone decides the resolution the images are prepared at
        parser.link_arguments("model.image_size", "data.init_args.image_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_data(config.get("data"), self.subcommand)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if self.subcommand == "fit" and (version := resume_version(config.trainer.get("logger"), ckpt_path)):
            run = os.path.dirname(os.path.dirname(str(ckpt_path)))
            print(f"resuming step {self.checkpoint_step} of {run}: logging into it")
            config.trainer.logger.init_args.version = version

    def instantiate_trainer(self, **kwargs):
        # the callbacks of the config, before Lightning adds its defaults to the same list
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks += [Resume(), GracefulStop()]
        use_atomic_checkpoints(trainer)
        # Lightning's own bar (none configured) -> the one that counts steps against max_steps
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is RichProgressBar and not any(callback is c for c in configured):
                trainer.callbacks[i] = StepProgressBar()
        return trainer

    def _at_checkpoint_step(self) -> None:
        """validate / test of a checkpoint: the trainer's step is the checkpoint's (Lightning restores
        only the weights), so that what is printed and logged names the model evaluated."""
        if self.checkpoint_step:
            loop = self.trainer.fit_loop.epoch_loop
            loop.automatic_optimization.optim_progress.optimizer.step.total.completed = self.checkpoint_step
            loop._batches_that_stepped = self.checkpoint_step

    def before_validate(self) -> None:
        super().before_validate()
        self._at_checkpoint_step()

    def before_test(self) -> None:
        super().before_test()
        self._at_checkpoint_step()

    def before_predict(self) -> None:
        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())


def _last(trainer, subcommand: str) -> str | None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of the run's log directory; None (a fresh fit, said
    in one line) when there is none, an error for the commands that evaluate a checkpoint."""
    path, searched = find_last(trainer)
    if path is None and subcommand != "fit":
        raise UserError(f"ckpt_path=last: no checkpoint in {', '.join(searched)}; give a checkpoint path")
    if path is None:
        print(
            f"--ckpt_path last: nothing to resume in {', '.join(searched) or 'this run'}; starting a new run"
        )
    return path


def _clip_length(max_length: int | None) -> int:
    """The model's caption length: the data module's, CLIP's 77 when it is unset."""
    return 77 if max_length is None else max_length


def make_cli(args: list[str] | None, run: bool) -> SuperCLIPCLI:
    return SuperCLIPCLI(
        LitSuperCLIP,
        ImageTextDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        parser_class=OneLineErrors,
        auto_configure_optimizers=False,  # LitSuperCLIP builds its own AdamW groups and schedule
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs(),
    )
