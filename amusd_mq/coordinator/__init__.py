"""The coordinator: `core` every decision as a pure state machine (each request's canonical state, the worker
registry, scheduling, the proposal relay, deadlines), over the records in `records` and the queue in `admission`;
`shell` the service, the sockets and the clock around it. Imports `wire`, `text` and the shared modules, never
`workers`, `runtime`, `frontend` or `bench`."""
