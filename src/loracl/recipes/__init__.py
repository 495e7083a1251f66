"""Recipes: what wires the components into a job (a continual run, a bench grid, its checkpoints and worker
processes). The top layer below the CLI: nothing under loracl imports from here except the CLI."""
