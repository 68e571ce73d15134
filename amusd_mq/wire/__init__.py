"""The wire: every message's definition and codec (`protocol`), the sockets and framing (`transport`), CURVE
(`security`). Imports nothing of ours but `config`, so every role can speak it."""
