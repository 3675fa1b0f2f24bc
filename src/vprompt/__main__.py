"""``python -m vprompt`` (and ``torchrun -m vprompt train ...``): the ``vprompt`` command."""

from vprompt.cli import main

if __name__ == "__main__":
    main()
