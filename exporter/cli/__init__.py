"""The command line: the value parsers, the option table (flags and ASYNQ_SIDECAR_* variables), the
arguments beyond it, the typed configs built from them, command dispatch, and the generator of
docs/configuration.md.

Imports the settings only; a command's module is loaded by name once it is chosen, so `--help`
loads none of them.
"""
