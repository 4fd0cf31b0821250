"""Provider adapters behind one `Provider` protocol, and the local emulator."""
