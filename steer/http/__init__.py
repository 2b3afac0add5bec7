"""The OpenAI-compatible HTTP front end (issue #15)."""
