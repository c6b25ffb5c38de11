"""Configs: model recipes (recipes/model/*.yaml) validated against hybrids.config.ModelConfig."""
