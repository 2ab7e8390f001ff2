"""Small worlds with known rewards (shapes, flow shapes) and the built-in example pipelines."""
