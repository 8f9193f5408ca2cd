from superclip_pl.cli import main

main()
