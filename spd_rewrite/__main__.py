"""Run the command line as ``python -m spd_rewrite``."""

from spd_rewrite.cli.app import main

main()
