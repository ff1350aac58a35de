"""E2B compatibility: unchanged ``e2b`` / ``e2b-code-interpreter`` SDK code runs against ``corral serve``."""
