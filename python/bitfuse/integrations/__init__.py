"""Integrations with model libraries (diffusers first). Each one imports its library lazily."""
