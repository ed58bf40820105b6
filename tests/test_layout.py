"""The package's shape, read from its source (AST): the maths imports neither Ray nor MLflow,
execution imports no tracking or method, only jobs meet MLflow; every registered job has its
`ray job submit` entry point; functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from genmem.jobs import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "genmem"

MATHS = ("data", "models", "generative", "posterior", "metrics", "methods")
# Library modules beside the maths packages: they too run without a cluster or a tracking server.
LIBRARY = ("checkpoint.py", "config.py", "errors.py", "evaluation.py", "seeds.py", "space.py", "storage.py", "training.py", "viz.py")
# A function longer than this many lines needs a reason here.
MAX_LINES = 60
LONG_FUNCTIONS: dict[str, str] = {}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (deferred imports count too), relative ones resolved."""
    package = ".".join(path.relative_to(ROOT / "platform").with_suffix("").parts[:-1]) if path.is_relative_to(PACKAGE) else ""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            out.add(base)
    return out


def _files(*names: str) -> list[Path]:
    files: list[Path] = []
    for name in names:
        target = PACKAGE / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return files


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files:
        for module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PACKAGE) if path.is_relative_to(PACKAGE) else path.name} imports {module}")
    return bad


def test_maths_and_library_import_neither_ray_nor_mlflow_nor_orchestration():
    forbidden = ("ray", "mlflow", "genmem.jobs", "genmem.distributed", "genmem.tracking", "genmem.cli", "accelerate")
    assert _offending(_files(*MATHS, *LIBRARY), forbidden) == []


def test_execution_layer_imports_no_tracking_and_no_method():
    forbidden = ("mlflow", "genmem.tracking", "genmem.methods", "genmem.jobs", "genmem.cli")
    assert _offending(_files("distributed"), forbidden) == []


def test_only_jobs_and_runs_import_tracking():
    parts = lambda p: p.relative_to(PACKAGE).parts  # noqa: E731
    everything = [p for p in PACKAGE.rglob("*.py") if not {"jobs", "runs"} & set(parts(p)) and p.name != "tracking.py"]
    assert _offending(everything, ("genmem.tracking",)) == []


def test_no_job_imports_another_and_runs_import_no_job():
    """The jobs share what they need through runs/; a job reaches another only through the registry."""
    jobs = [p for p in _files("jobs") if p.name not in ("__init__.py", "base.py", "registry.py")]
    names = [f"genmem.jobs.{p.stem}" for p in jobs]
    bad = [f"{p.stem} imports {m}" for p in jobs for m in _imports(p)
           if any(m == n or m.startswith(n + ".") for n in names if n != f"genmem.jobs.{p.stem}")]
    # `from genmem.jobs import train` names the module too
    bad += [f"{p.stem} imports genmem.jobs.{a.name}" for p in jobs for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "genmem.jobs" for a in node.names if a.name not in ("registry", "base")]
    assert bad == []
    assert _offending(_files("runs"), ("genmem.jobs", "genmem.cli")) == []


def test_the_layering_check_sees_a_violation(tmp_path):
    # The check itself can fail: deferred imports inside a function are found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import ray.train\n    from genmem.tracking import Tracker\n")
    assert sorted(_offending([probe], ("ray", "genmem.tracking"))) == ["probe.py imports genmem.tracking", "probe.py imports ray.train"]


def test_every_registered_job_has_its_entry_point_and_nothing_else_does():
    entry_points = {p.stem for p in (ROOT / "jobs").glob("*.py")}
    assert entry_points == set(registry.NAMES)
    for job in registry.all_jobs():
        text = (ROOT / "jobs" / f"{job.name}.py").read_text()
        assert "entry_point(__file__)" in text


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_job_declares_what_the_cli_and_tune_need(name):
    job = registry.get(name)
    assert job.help and job.config.model_fields
    if job.sweepable:
        assert job.metrics, f"{name} is sweepable but declares no metric its trials report"


def test_functions_stay_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(PACKAGE)}:{node.name}"
                if lines > MAX_LINES and where not in LONG_FUNCTIONS:
                    long.append(f"{where} ({lines} lines)")
    assert long == []


def test_no_code_outside_generative_branches_on_the_process_class():
    """Processes carry their coefficients and conversions (Process.alpha_sigma, score, memoryless,
    ...): a third process then works everywhere, instead of failing in an isinstance chain."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if "generative" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
                if names & {"FlowMatching", "VPDiffusion"}:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert bad == []


# Where genmem may write os.environ, and why: nowhere else (library code reads the environment only).
ENVIRONMENT_WRITERS = {
    "distributed/cluster.py": "enter_environment: a Ray worker or trial takes the driver's storage and tracking",
    "distributed/verbosity.py": "set_verbose: the CLI's --verbose, inherited by the processes Ray starts",
    "distributed/tune.py": "Tune reads a stopped trial's grace from the driver's environment",
    "tracking.py": "MLflow's telemetry off by default, before MLflow is imported (its thread's environment writes race requests')",
}


def _environment_writes(path: Path) -> list[int]:
    """Lines that write ``os.environ``: item assignment or deletion, or a mutating method."""
    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            lines += [node.lineno for t in targets if isinstance(t, ast.Subscript) and is_environ(t.value)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("update", "setdefault", "pop", "popitem", "clear") and is_environ(node.func.value):
                lines.append(node.lineno)
            elif node.func.attr == "putenv":
                lines.append(node.lineno)
    return sorted(lines)


def test_only_the_execution_layer_writes_the_environment():
    bad = [f"{p.relative_to(PACKAGE)}:{line}" for p in PACKAGE.rglob("*.py") if str(p.relative_to(PACKAGE)) not in ENVIRONMENT_WRITERS
           for line in _environment_writes(p)]
    assert bad == []


def test_the_environment_check_sees_a_write(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nos.environ['A'] = '1'\nos.environ.update({})\ndel os.environ['A']\nx = os.environ.get('B')\n")
    assert _environment_writes(probe) == [2, 3, 4]


def test_the_readme_layout_names_every_file():
    """The README's Layout table puts every module of the package on one layer."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    table = section[: section.index("\n\n", section.index("| layer |"))]
    rows = {line.split("|")[1].strip(" *"): line for line in table.splitlines() if line.startswith("| **")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py":
            continue
        name = rel.stem if rel.parts[0] == "jobs" and rel.stem in registry.NAMES else rel.name  # a job by its name
        folder = f"`{rel.parts[0]}/`" if len(rel.parts) > 1 else None
        rows_with = [layer for layer, line in rows.items() if f"`{name}`" in line and (folder is None or folder in line)]
        if not rows_with:
            missing.append(str(rel))
    assert missing == [], f"README Layout does not name {missing}"


def test_the_readme_shows_the_arm_table_the_demo_prints():
    """`make demo` compares the arm table it printed with the README's (examples/demo_table.py):
    the README's own table passes with other wall times, and fails where one figure or one arm
    differs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "examples" / "demo_table.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    readme = (ROOT / "README.md").read_text()
    rows = demo.arm_table(readme)
    assert rows[0].startswith("arm scale memorised") and len(rows) == 8  # θ* and 2 methods x 3 scales
    block = readme[readme.index("\narm ") + 1: readme.index("```", readme.index("\narm "))]
    slower = "\n".join(line.rsplit(None, 1)[0] + "  99.9" if line[:1].isalpha() and not line.startswith("arm") else line
                       for line in block.splitlines())
    assert demo.differences(slower, readme) == []
    assert demo.differences(slower + "\nC_T < 0: samples closer to train than held-out data is", readme) == []  # as printed
    theta = block.splitlines()[2]
    changed = block.replace(theta, theta.replace(theta.split()[2], f"{float(theta.split()[2]) + 0.01:.3f}", 1))
    assert len(demo.differences(changed, readme)) == 1
    assert demo.differences("\n".join(block.splitlines()[:-1]), readme) == ["the printed table has 6 arms, the README's 7"]
    with pytest.raises(ValueError, match="no arm table"):
        demo.arm_table("arm scale\nno dashes")
