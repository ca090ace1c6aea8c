"""The fault suite: real processes, real signals, real files."""
