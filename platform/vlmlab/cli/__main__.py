"""``python -m vlmlab.cli``: the ``vlmlab`` command."""

from vlmlab.cli import main

main()
