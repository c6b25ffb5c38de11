"""Configs: model recipes (recipes/models/*.yaml) validated against hybrids.config.ModelConfig."""
