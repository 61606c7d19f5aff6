"""The stage order, stated once: each stage imports only the stages below it, so the tree
cannot drift back into a tangle. Imports inside functions count, as they do at run time."""
import ast

from tests.conftest import ROOT

# The stages from the bottom up, and what each may import. The report reads output/ files
# alone, so it stands on the base modules only (no torch, no model, no engine).
BASE = "base"
STAGES = {
    BASE: (),
    "data": (BASE,),
    "models": (BASE, "data"),
    "engine": (BASE, "data", "models"),
    "study": (BASE, "data", "models", "engine"),
    "report": (BASE,),
}
# Entry points: the user's commands and the names users know under their old address. They
# may import any stage; no stage imports them.
ENTRY_POINTS = {"main", "predict", "utils.helpers", "utils.benchmark", "utils.report.__main__"}
BASE_MODULES = {"config", "utils", "utils.device", "utils.env", "utils.files", "utils.config_file",
                "utils.experiments", "utils.metrics"}


def stage_of(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    if module in BASE_MODULES:
        return BASE
    for prefix, stage in (("preprocess", "data"), ("backbones", "models"), ("utils.engine", "engine"),
                          ("utils.study", "study"), ("utils.report", "report")):
        if module == prefix or module.startswith(prefix + "."):
            return stage
    raise AssertionError(f"{module} belongs to no stage: place it in tests/test_stages.py")


def project_modules() -> dict:
    skip = {"tests", ".git", "output", "data"}
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if skip & set(rel.parts):
            continue
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        modules[".".join(parts)] = path
    return modules


def imported(path, modules) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def upward_imports(modules) -> list[str]:
    wrong = []
    for module, path in modules.items():
        stage = stage_of(module)
        for target in imported(path, modules):
            target_stage = stage_of(target)
            if target_stage == "entry" and stage != "entry":
                wrong.append(f"{module} imports the entry point {target}")
            elif stage not in ("entry", target_stage) and target_stage not in STAGES[stage]:
                wrong.append(f"{module} ({stage}) imports {target} ({target_stage})")
    return sorted(wrong)


def test_every_stage_imports_only_the_stages_below_it():
    assert upward_imports(project_modules()) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule is live: an engine module that imports the report is named."""
    modules = project_modules()
    rogue = tmp_path / "rogue.py"
    rogue.write_text("from utils.report.tables import comparison_table\nimport torch\n")
    modules["utils.engine.rogue"] = rogue
    assert upward_imports(modules) == ["utils.engine.rogue (engine) imports utils.report.tables (report)"]


def test_utils_holds_at_most_six_modules_of_its_own():
    """Everything else lives in a stage package; the entry points only re-export."""
    own = {p.stem for p in (ROOT / "utils").glob("*.py")} - {"__init__", "helpers", "benchmark"}
    assert len(own) <= 6, sorted(own)
    for alias in ("helpers", "benchmark"):  # a name users know, kept as a thin re-export
        assert len((ROOT / "utils" / f"{alias}.py").read_text().splitlines()) <= 6
