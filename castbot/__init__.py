"""castbot: a transcript becomes a character chatbot (shared library code)."""
