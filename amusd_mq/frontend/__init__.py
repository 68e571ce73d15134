"""What users reach: the Python async client, the OpenAI wire format and the HTTP gateway over the client, and the
gateway's metrics. Imports `wire` and the shared modules, never the services' internals or `bench`."""
