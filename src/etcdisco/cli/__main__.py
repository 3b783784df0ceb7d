"""``python -m etcdisco.cli`` runs the command line (as ``python -m etcdisco`` does)."""

from ._main import main

main()
