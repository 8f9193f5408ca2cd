"""The command line: ``superclip fit|validate|test|predict`` (the LightningCLI in ``lightning_cli``),
``export`` and ``import`` (``commands``), the checks run before a run is built (``checks``), what a run
does at its end (``run_end``), and the dispatch in ``main`` that imports none of them until needed."""

from superclip_pl.cli.main import main

__all__ = ["main"]
