"""Prefect flows over the DVC pipeline.

Importing ftpipe first sets the pipeline's defaults (telemetry off, see ftpipe/__init__.py) before
`flows.pipeline` and `flows.retrain` import prefect.
"""

import ftpipe  # noqa: F401
