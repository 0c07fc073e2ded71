"""CLI command groups that live in their own modules."""
