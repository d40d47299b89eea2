"""Gradio apps of the workbench: `python -m apps.<name>_app` starts one."""
