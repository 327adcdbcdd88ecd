"""HTTP API of the training service (FastAPI): jobs, metrics, results, checkpoints, catalog."""
