"""A local provider emulator speaking OpenAI's and Anthropic's real wire formats.

It imitates the providers, so it is a separate program in spirit: batchwise reaches it only
over HTTP, like any real provider.
"""

from batchwise.emulator.app import Emulator, EmulatorConfig, run_server

__all__ = ["Emulator", "EmulatorConfig", "run_server"]
