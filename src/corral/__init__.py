"""Corral: sandboxes for AI agents."""
