"""launch/ is a folder of scripts, not a package: the tests import a script from its path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def load_launch_script(name: str) -> ModuleType:
    """launch/<name>.py as the module `<name>_script`."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
