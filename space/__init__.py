"""space package: arrives with its issue."""
