"""``python -m forge``: see forge/cli.py."""

from forge.cli import main

if __name__ == "__main__":
    main()
