"""ComfyUI-Whetstone: train Z-Image LoRAs from ComfyUI. Registers the pack's V1 nodes and its web extension.

ComfyUI imports this folder as a package (under a name derived from its path), so everything inside the pack is
imported relatively. Importing it outside ComfyUI works too (tests, CI): no ComfyUI module is imported here, and
nothing global is changed; the whetstone_* model folders are registered with folder_paths only when ComfyUI is the
importer.
"""

WEB_DIRECTORY = "./js"

if __package__:  # ComfyUI (and the tests' load_pack) import this folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_with_comfyui

    register_with_comfyui()
else:  # a lone module, as pytest imports a rootdir __init__.py from a folder whose name is no identifier
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
