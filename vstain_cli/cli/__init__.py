"""Command-line interface: the only package that imports typer and rich; one module per command.

May import: everything below it (the whole core library)."""
