"""``python -m plateflow`` runs the command-line interface."""

from plateflow.cli import main

raise SystemExit(main())
