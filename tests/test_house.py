"""The house rules, read from the source: which package may import which, and no references a reader of the
repository cannot follow."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lsq_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))

# part -> the parts of lsq_jax it may import (besides itself). A part is a subpackage or a top-level module.
MAY_IMPORT = {
    "config": set(),
    "data": {"config"},
    "models": {"config"},
    "optim": {"config"},
    "preemption": set(),
    "workdir": {"preemption"},
    "checkpoint": {"config", "workdir"},
    "mesh": {"config"},
    "plan": {"config", "data", "models", "optim", "mesh"},
    "train": {"config", "data", "models", "optim", "plan", "checkpoint", "mesh", "preemption", "workdir"},
    "eval": {"config", "data", "models", "plan", "mesh", "workdir"},
    "bench": {"config", "data", "models", "optim", "plan", "checkpoint", "mesh", "workdir", "train", "eval"},
    "main": {"config", "checkpoint", "mesh", "plan", "preemption", "workdir", "train", "eval", "models"},
}


def part(module: str) -> str:
    """'lsq_jax.train.loop' -> 'train'; 'lsq_jax.main' -> 'main'."""
    return module.split(".")[1]


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """Every module `path` imports (at any depth of the file), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names
                    if node.module == "lsq_jax"]
    return out


def test_every_part_is_known():
    assert {part(module_name(p)) for p in MODULES if p.parent != PACKAGE or p.name != "__init__.py"} <= set(MAY_IMPORT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_layers(path):
    me = part(module_name(path)) if path != PACKAGE / "__init__.py" else None
    for name, line in imports(path):
        if name.startswith("orbax"):
            assert me == "checkpoint", f"{path.name}:{line} imports {name}: only checkpoint.py uses Orbax"
        if name.startswith("lsq_jax.") and me is not None:
            other = part(name)
            assert other == me or other in MAY_IMPORT[me], f"{module_name(path)}:{line} imports {name}"


def test_models_never_import_data_and_eval_never_train():
    for path in MODULES:
        me = part(module_name(path)) if path != PACKAGE / "__init__.py" else None
        for name, line in imports(path):
            assert not (me == "models" and name.startswith("lsq_jax.data")), (path, line)
            assert not (me == "eval" and name.startswith("lsq_jax.train")), (path, line)


def test_main_imports_train_only_for_training():
    """main's module-level imports leave out train, so --mode=eval and --mode=construct never load it."""
    tree = ast.parse((PACKAGE / "main.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or "", *[f"{node.module}.{a.name}" for a in node.names]]
            assert not any(n.startswith("lsq_jax.train") for n in names), ast.dump(node)


SOURCES = [*MODULES, *sorted((ROOT / "configs").glob("*.py")), ROOT / "README.md"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_references_a_reader_cannot_follow(path):
    text = path.read_text()
    assert "sys.path" not in text or path.suffix == ".md"
    assert not re.search(r"\bSPEC\b", text), path
    assert not re.search(r"\b(issue|task|tracker) #?\d+|(?<![\w&])#\d+\b", text, re.IGNORECASE), path


def calls(path: pathlib.Path, name: str) -> int:
    """How many calls of a function called `name` (plain or as an attribute) `path` makes."""
    return sum(isinstance(n, ast.Call) and name in (getattr(n.func, "id", None), getattr(n.func, "attr", None))
               for n in ast.walk(ast.parse(path.read_text())))


@pytest.mark.parametrize("name", ["make_task", "parameter_count"])
def test_the_plan_alone_builds_the_task_and_counts_the_parameters(name):
    assert {module_name(p): calls(p, name) for p in MODULES if calls(p, name)} == {"lsq_jax.plan.report": 1}


def test_only_the_workdir_and_the_checkpoint_ask_which_process_writes():
    askers = {module_name(p) for p in MODULES if calls(p, "is_writer") or calls(p, "process_index")}
    assert askers == {"lsq_jax.workdir", "lsq_jax.checkpoint"}


def test_the_plan_alone_builds_the_optimizer():
    builders = {module_name(p) for p in MODULES if not module_name(p).startswith("lsq_jax.optim")
                and (calls(p, "make_optimizer") or calls(p, "make_lm_optimizer"))}
    assert builders == {"lsq_jax.plan.run"}
