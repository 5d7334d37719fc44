"""Serving the model library over HTTP: the OpenAI request/response formats (``protocol``)
and the inference server process (``server``: ``python -m models.serving``)."""
