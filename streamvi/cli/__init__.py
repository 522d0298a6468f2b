"""Command-line interface (click); each command builds the config and calls the library."""
