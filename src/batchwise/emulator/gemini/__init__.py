"""The emulator's Gemini API (generateContent, batch mode, Files)."""
