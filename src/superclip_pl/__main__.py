import sys

from superclip_pl.cli.main import main

sys.exit(main())
