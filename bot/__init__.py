"""bot package: arrives with its issue."""
