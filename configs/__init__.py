"""The shipped recipes: this folder is installed as ``superclip_pl.recipes`` (pyproject.toml), so that
``superclip recipes`` and ``superclip fit --config NAME`` find them without the repository."""
