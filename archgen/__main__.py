"""`python -m archgen` runs the command line, like the `archgen` script."""

from archgen.cli import main

main(prog_name="archgen")
