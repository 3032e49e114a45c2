"""The repository's config files (configs/*.py), loaded by path: configs/ is not a package."""
import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"configs.{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name: str, arg: str | None = None):
    """configs/<name>.py's get_config(arg)."""
    return load(name).get_config(arg)
