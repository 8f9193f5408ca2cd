"""``python -m superclip_pl.demo``: the offline demo (``superclip_pl.shapes.demo``) under a short name.

Run as a script only: importing this module imports nothing, so the library still never loads the
demo or its plotting extra.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("superclip_pl.shapes.demo", run_name="__main__", alter_sys=True)
