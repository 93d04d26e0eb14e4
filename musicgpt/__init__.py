"""musicgpt: learn piano music from MIDI with a relative-attention GPT and write new MIDI."""

__version__ = "0.1.0"
