"""Prompt sources: built-in synthetic tasks and the verl/Klear row format."""
