"""Pure tensor maths. Nothing here walks a model or reads a config."""
