"""The sidecar process: the composition root (sidecar: builds every component on one exit stack,
runs the event task, serves `serve`), the HTTP endpoints and the exporter-toolkit web config.

May import every package except cli/ and devtools/.
"""
