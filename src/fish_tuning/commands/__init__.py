"""The ``fish-tune`` subcommands that take their own argument parsers (train, mask) and the preset lookup.

Each module is imported only when its command runs, so ``fish-tune --version`` and ``--help`` stay quick.
"""
