"""``python -m agent`` is the same as the ``nodemesh`` command."""

from agent.cli import main

raise SystemExit(main())
