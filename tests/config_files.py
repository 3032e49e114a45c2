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


# A small final report (iterated use and the out-of-distribution grid) for a command-line run whose report
# is not what the test is about: the smoke variant's own sizes cost about 10 s of computation per run.
SMALL_REPORT = {"train.eval_problems": 4, "train.eval_iters": 5, "train.eval_batch_size": 32}
SMALL_REPORT_FLAGS = [f"--config.{k}={v}" for k, v in SMALL_REPORT.items()]
