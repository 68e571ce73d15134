"""The wire: every message's definition and codec (`protocol`), the names its fields carry (`codes`: error codes,
sampling modes, policies, roles), the sockets and framing (`transport`), CURVE (`security`). Imports nothing of ours but `config`, so every role can speak it."""
