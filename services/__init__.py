"""Commands a user runs beside the pipeline: the team stack (services.stack) and model serving (services.serve)."""
