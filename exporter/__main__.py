"""`python -m exporter` is the same as the `asynq-sidecar` command."""

from exporter.cli.main import main

raise SystemExit(main())
