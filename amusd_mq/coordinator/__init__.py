"""The coordinator: its pure core (every request's canonical state, the worker registry, scheduling, what to send
to whom), `admission` (which request runs next), and the shell that owns its sockets. Imports `wire`, `text` and the
shared modules, never `workers`, `runtime`, `frontend` or `bench`."""
