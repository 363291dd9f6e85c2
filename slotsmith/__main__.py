"""``python -m slotsmith``: the same command line as the ``slotsmith`` script."""

from slotsmith.cli import main

if __name__ == "__main__":
    main(prog_name="slotsmith")
