"""The typer command line: parse, call a stage, print."""
