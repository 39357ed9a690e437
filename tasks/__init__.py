"""One module per task, each registered by name: `get_task("retrieval")`, `list_tasks()`."""
from .base import Task, get_task, list_tasks, register_task, registered_task, stack_images

# Importing a task module registers it.
from . import captioning, classification, detection, retrieval, text_to_image, vqa  # noqa: E402,F401

__all__ = ["Task", "get_task", "list_tasks", "register_task", "registered_task", "stack_images"]
