"""Recipes and running them."""
