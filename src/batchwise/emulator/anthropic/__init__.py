"""The emulator's Anthropic API: Messages and Message Batches."""
