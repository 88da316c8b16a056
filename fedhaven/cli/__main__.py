"""``python -m fedhaven.cli``: the same command line as the ``fedhaven`` script."""

from fedhaven.cli import main

if __name__ == "__main__":
    main()
