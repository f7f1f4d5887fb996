"""HTTP routes: thin functions that take dependencies and hold no model logic."""
