"""``python -m idefics_kit``: the ``idefics-kit`` command line."""

from idefics_kit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
