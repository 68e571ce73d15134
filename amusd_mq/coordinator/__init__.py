"""The coordinator: `shell` the service (every request's canonical state, the worker registry, scheduling, and the
sockets it all travels on), `admission` (which request runs next). Imports `wire`, `text` and the shared modules,
never `workers`, `runtime`, `frontend` or `bench`."""
