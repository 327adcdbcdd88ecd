"""The ``ssql`` command: run the service locally (``up``, ``demo``) and talk to its HTTP API."""
