"""``python -m etcdisco`` runs the command line."""

from .cli import main

main()
