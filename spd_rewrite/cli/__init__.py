"""The typer command line of spd-rewrite."""
