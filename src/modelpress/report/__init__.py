"""The single-file HTML report and the terminal summary."""
