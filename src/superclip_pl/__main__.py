import sys

from superclip_pl.cli import main

sys.exit(main())
