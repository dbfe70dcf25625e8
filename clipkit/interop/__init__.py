"""Interoperability with open_clip: its models behind clipkit's encoder API, and export to it."""
