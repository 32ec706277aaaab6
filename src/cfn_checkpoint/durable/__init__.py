"""The durable tier: schema, migrations and the stores that hold rows and checkpoints."""
