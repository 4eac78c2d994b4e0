"""``python -m breastscan`` is the ``breastscan`` command."""

from breastscan.cli import main

if __name__ == "__main__":
    main()
