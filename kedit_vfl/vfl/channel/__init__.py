"""The two-party channel: identities, TLS transport, protocol, sessions, alignment, the passive party."""
