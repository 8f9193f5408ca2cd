"""``superclip fit|validate|test|export|import``: the LightningCLI entry point."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from superclip_pl.eval.evaluation import SetEvaluation
from superclip_pl.eval.results import write_results
from superclip_pl.module import LitSuperCLIP


class SuperCLIPCLI(LightningCLI):
    """LightningCLI with the links between the data and the model, and ``metrics.json`` after each run."""

    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer and one caption length feed both the data pipeline and the model
        parser.link_arguments("data.init_args.tokenizer", "model.tokenizer")
        parser.link_arguments("data.init_args.max_length", "model.max_length")
        # the classification targets are cut in the data workers, at the model's class_max_length
        parser.link_arguments("model.class_max_length", "data.init_args.class_max_length")
        # the backbone decides the resolution the images are prepared at
        parser.link_arguments("model.image_size", "data.init_args.image_size", apply_on="instantiate")

    def _write_metrics(self, earlier: dict | None = None) -> None:
        """Write the run's final metrics as one flat JSON object to ``<log_dir>/metrics.json``; those
        of ``earlier`` that the last loop did not log again (training metrics) are kept."""
        trainer = self.trainer
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return
        values = {**(earlier or {}), **trainer.callback_metrics}
        metrics = {k: float(v) for k, v in sorted(values.items()) if v.numel() == 1}
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {log_dir / 'metrics.json'}")
        for path in write_results(log_dir, [c for c in trainer.callbacks if isinstance(c, SetEvaluation)]):
            print(f"results written to {path}")

    def _stale_evaluation(self) -> int | None:
        """The step of the last evaluation during fit when it is not the final step (a validation
        interval that does not divide ``max_steps``), else None."""
        trainer = self.trainer
        if trainer.interrupted:
            return None
        steps = [self.model.validated_at]
        steps += [c.evaluated_at for c in trainer.callbacks if isinstance(c, SetEvaluation)]
        ran = [s for s in steps if s is not None]
        return min(ran) if ran and min(ran) != trainer.global_step else None

    def _save_final_checkpoint(self) -> None:
        """ModelCheckpoint keeps as ``last.ckpt`` the last checkpoint of its own schedule (every n
        steps, after validations), which is older than the final model when the schedule does not
        divide ``max_steps``; then the final model replaces it."""
        trainer = self.trainer
        if trainer.interrupted or self.model.saved_at == trainer.global_step:
            return
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "")
            if not (callback.save_last and path):
                continue
            if trainer.is_global_zero and os.path.islink(path):  # save_last="link": a file of its own now
                os.unlink(path)
            trainer.strategy.barrier()
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                print(f"final model (step {trainer.global_step}) saved to {path}")

    def after_fit(self) -> None:
        self._save_final_checkpoint()
        stale, earlier = self._stale_evaluation(), dict(self.trainer.callback_metrics)
        if stale is not None:
            if self.trainer.is_global_zero:
                print(
                    f"last evaluation was at step {stale}, training ended at step "
                    f"{self.trainer.global_step}: evaluating the final model"
                )
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._write_metrics(earlier)

    def after_validate(self) -> None:
        self._write_metrics()

    def after_test(self) -> None:
        self._write_metrics()


def main(args: list[str] | None = None, run: bool = True) -> SuperCLIPCLI | None:
    """Console entry point; ``args`` (a list) lets tests call it in-process. With ``run=False`` the
    arguments carry no subcommand and the CLI only parses and instantiates."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        from superclip_pl.export import main as export_main

        export_main(argv[1:])
        return None
    if argv and argv[0] == "import":
        from superclip_pl.importer import main as import_main

        import_main(argv[1:])
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from superclip_pl.data import ImageTextDataModule

    return SuperCLIPCLI(
        LitSuperCLIP,
        ImageTextDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # LitSuperCLIP builds its own AdamW groups and schedule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and evaluate SuperCLIP models (CLIP + vocabulary classifier)."},
    )


if __name__ == "__main__":
    main()
