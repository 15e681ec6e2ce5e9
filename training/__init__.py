"""Whetstone's training library: model, data, hardware planner and engine. Never imports ComfyUI."""
