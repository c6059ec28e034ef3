"""Prefect flows over the DVC pipeline.

Importing ftpipe first sets the pipeline's defaults (telemetry off, see ftpipe/__init__.py) before
`flows.pipeline` and `flows.retrain` import prefect; Prefect reads its settings when imported.
"""

import os

import ftpipe  # noqa: F401

# With no server configured, Prefect waits 20 s for its temporary one, whose first start on a new
# PREFECT_HOME also migrates the database: on an idle 2-core AMD EPYC it answered after 21 s (11 s on a
# migrated home), about 27 s beside a 2-thread matmul, and the run died before its first stage. A user's own
# value is kept (setdefault).
TEMPORARY_SERVER_START_S = "180"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", TEMPORARY_SERVER_START_S)
