"""The cn4 REST service: API, job queue, workers and the service commands."""
