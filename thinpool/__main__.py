"""``python -m thinpool``: the ``thinpool`` command line."""

from thinpool.cli import main

if __name__ == "__main__":
    main(prog_name="thinpool")
