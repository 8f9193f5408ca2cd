"""The end of a ``superclip`` run: a fit ends with its final model saved and evaluated, every run
writes its final metrics to ``metrics.json`` (plus ``results.md`` / ``.csv``) in its log directory, and
closes with one line saying what it did and where its outputs are."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from superclip_pl.eval.evaluation import SetEvaluation
from superclip_pl.eval.results import write_results


class RunEnd:
    """What a LightningCLI (``self.trainer``, ``self.model``, ``self.datamodule``) does after each run."""

    started: float | None = None  # time.monotonic() at the start of the run

    def _write_metrics(self, earlier: dict | None = None) -> str | None:
        """Write the run's final metrics as one flat JSON object to ``<log_dir>/metrics.json``; those
        of ``earlier`` that the last loop did not log again (training metrics) are kept. Returns where
        they are, for the closing line (None on ranks other than 0)."""
        trainer = self.trainer
        where = str(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return None
        values = {**(earlier or {}), **trainer.callback_metrics}
        metrics = {k: float(v) for k, v in sorted(values.items()) if v.numel() == 1}
        fs, _ = fsspec.core.url_to_fs(where)
        remote = not isinstance(fs, LocalFileSystem)  # a log directory in object storage: written here, put
        with tempfile.TemporaryDirectory() as staging:
            log_dir = Path(staging if remote else where)
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            evaluations = [c for c in trainer.callbacks if isinstance(c, SetEvaluation)]
            tables = write_results(log_dir, evaluations)
            if remote:
                for path in [log_dir / "metrics.json", *tables]:
                    fs.put_file(str(path), f"{where.rstrip('/')}/{path.name}")
        shown = f"{where.rstrip('/')}/metrics.json" if remote else str(Path(where) / "metrics.json")
        beside = f" ({', '.join(p.name for p in tables)} beside it)" if tables else ""
        return f"metrics {shown}{beside}"

    def _elapsed(self) -> str:
        seconds = round(time.monotonic() - self.started) if self.started is not None else 0
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def _closing_line(self, what: str, metrics: str | None) -> None:
        if metrics is not None:  # rank 0
            print(f"superclip {self.subcommand}: {what}; {metrics}")

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

    def before_fit(self) -> None:
        self.started = time.monotonic()

    def before_validate(self) -> None:
        self.started = time.monotonic()

    def before_test(self) -> None:
        self.started = time.monotonic()

    def _fit_summary(self) -> str:
        trainer = self.trainer
        ending = "stopped at" if trainer.interrupted else "done,"
        budget = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        samples = int(self.model.samples_seen)
        paths = [c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks]
        ckpt = f"checkpoint {paths[0]}" if paths and paths[0] else "no checkpoint"
        return (
            f"{ending} step {trainer.global_step}{budget}, {samples} samples seen, {self._elapsed()}; {ckpt}"
        )

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
        self._closing_line(self._fit_summary(), self._write_metrics(earlier))

    def after_validate(self) -> None:
        self._closing_line(f"done, {self._elapsed()}", self._write_metrics())

    def after_test(self) -> None:
        self._closing_line(f"done, {self._elapsed()}", self._write_metrics())
