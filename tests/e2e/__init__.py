"""End-to-end tests on a real ComfyUI server and its web frontend (upstream host only)."""
