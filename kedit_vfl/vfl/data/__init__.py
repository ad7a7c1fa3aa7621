"""Tables and their encoding: reading, the feature schema, encoding, loading a party, the demo data."""
