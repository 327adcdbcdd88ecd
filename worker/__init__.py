"""The training worker: a Celery task that claims a job and supervises a training subprocess."""
