"""The HTTP transport (Quart-Trio): the only layer that knows about requests, statuses
and headers. It parses and validates what clients send, calls the logic, and maps
domain errors to the OpenAI error shape in one place (``errors.py``)."""
