"""The wire: every message's definition and codec (`protocol`), the names its fields carry (`codes`: error codes,
sampling modes, policies, roles), the sockets and framing (`transport`), CURVE (`security`), and the message
faults a service's sockets can be made to suffer for tests (`faults`). Imports nothing of ours but `config`, so
every role can speak it."""
