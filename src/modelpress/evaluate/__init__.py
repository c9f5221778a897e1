"""Quality metrics that run the same way on a torch model and on an exported artifact."""
