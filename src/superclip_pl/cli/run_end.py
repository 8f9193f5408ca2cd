"""The end of a ``superclip`` run: a fit ends with its final model saved and evaluated, and every run
writes its final metrics to ``metrics.json`` (plus ``results.md`` / ``.csv``) in its log directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from superclip_pl.eval.evaluation import SetEvaluation
from superclip_pl.eval.results import write_results


class RunEnd:
    """What a LightningCLI (``self.trainer``, ``self.model``, ``self.datamodule``) does after each run."""

    def _write_metrics(self, earlier: dict | None = None) -> None:
        """Write the run's final metrics as one flat JSON object to ``<log_dir>/metrics.json``; those
        of ``earlier`` that the last loop did not log again (training metrics) are kept."""
        trainer = self.trainer
        where = str(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return
        values = {**(earlier or {}), **trainer.callback_metrics}
        metrics = {k: float(v) for k, v in sorted(values.items()) if v.numel() == 1}
        fs, _ = fsspec.core.url_to_fs(where)
        remote = not isinstance(fs, LocalFileSystem)  # a log directory in object storage: written here, put
        with tempfile.TemporaryDirectory() as staging:
            log_dir = Path(staging if remote else where)
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            evaluations = [c for c in trainer.callbacks if isinstance(c, SetEvaluation)]
            written = [log_dir / "metrics.json", *write_results(log_dir, evaluations)]
            for path in written:
                if remote:
                    fs.put_file(str(path), f"{where.rstrip('/')}/{path.name}")
                shown = f"{where.rstrip('/')}/{path.name}" if remote else path
                print(f"{'metrics' if path.name == 'metrics.json' else 'results'} written to {shown}")

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
            # save_last="link": a file of its own now
            if trainer.is_global_zero and "://" not in path and os.path.islink(path):
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
