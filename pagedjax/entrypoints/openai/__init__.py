"""OpenAI-compatible server: `pagedjax serve` / `python -m pagedjax.entrypoints.openai`."""
