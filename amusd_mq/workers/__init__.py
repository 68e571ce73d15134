"""The draft and verify workers: the step loop they share (`step`), each role, and the verifier's cost line
(`speculation`). Imports `wire`, `runtime` and the shared modules, never `coordinator`, `frontend` or `bench`."""
