"""The emulator's OpenAI API: Files, Batches, chat completions, responses and embeddings."""
