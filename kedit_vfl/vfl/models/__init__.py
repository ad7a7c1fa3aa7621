"""The networks and how they are stored in artifacts."""
