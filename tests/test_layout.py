"""
The shape of the code, which is a feature here: people read it top to bottom. Budgets of lines per
file and per function, train.py in run order, no script importing a script, no import circles.
"""
import ast
import re
import sys

import pytest

from conftest import ROOT, run

BUDGETS = {"train.py": 600, "model.py": 390, "common.py": 350, "README.md": 300}
MODULES = sorted(p for p in ROOT.glob("*.py") if not p.name.startswith("test_"))

def tree(path):
    return ast.parse(path.read_text(), filename=str(path))

def test_files_and_functions_keep_their_budgets():
    for name, budget in BUDGETS.items():
        lines = len((ROOT / name).read_text().splitlines())
        assert lines <= budget, f"{name} has {lines} lines, over its budget of {budget}: grow by adding a file"
    for path in MODULES:
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                budget = 150 if (path.name, node.name) == ("train.py", "main") else 80
                assert size <= budget, f"{path.name}:{node.name} is {size} lines, over {budget}: split it"

def test_train_py_reads_in_run_order():
    # the settings, then main(), then the helpers in the order main() first calls them; and every
    # other jump between train.py's own functions goes down the file too
    body = tree(ROOT / "train.py").body
    defs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    line = {n.name: n.lineno for n in defs}
    main = next(n for n in defs if n.name == "main")
    settings = [n.name for n in defs if n.lineno < main.lineno]
    assert settings == ["TrainConfig"], f"only the settings come before main(), not {settings}"
    called = []  # train.py's names that main() uses, in the order it first uses them
    for node in sorted((n for n in ast.walk(main) if isinstance(n, ast.Name)), key=lambda n: (n.lineno, n.col_offset)):
        if node.id in line and node.id not in called and node.id != "main" and node.id not in settings:
            called.append(node.id)
    assert called == sorted(called, key=line.get), f"main() calls {called}, defined in another order"
    for d in defs:
        for node in ast.walk(d):
            if isinstance(node, ast.Name) and node.id in line and node.id not in settings and node.id != d.name:
                assert line[node.id] > d.lineno, f"{d.name} (line {d.lineno}) jumps up to {node.id}"

def imports_of(path):
    names = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names

def test_no_script_imports_a_script_and_no_import_circles():
    ours = {p.stem: p for p in MODULES}
    scripts = {name for name, p in ours.items() if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert {"prepare", "train", "sample", "export", "bench"} <= scripts
    graph = {name: imports_of(p) & set(ours) for name, p in ours.items()}
    for name, deps in graph.items():
        assert not deps & scripts, f"{name}.py imports the script(s) {deps & scripts}: move what they share to a module"

    def visit(name, path):
        assert name not in path, f"an import circle: {' -> '.join(path + [name])}"
        for dep in graph[name]:
            visit(dep, path + [name])
    for name in graph:
        visit(name, [])

@pytest.mark.slow
def test_the_model_tests_need_no_corpus_and_no_network(tmp_path):
    # no ../shared and no way out: the model's numeric tests still run, and pass
    offline = {"LLAMA_TEST_SHARED": str(tmp_path / "nothing"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_model.py", "-k", "rope or cache"],
                 env=offline)
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, result.stdout

def test_what_the_scripts_write_by_default_is_ignored_by_git():
    ignored = set((ROOT / ".gitignore").read_text().split())
    # prepare.py -> data/, train.py -> out/, export.py -> hf/ and gguf/, runs.py -> runs.png, plan.py -> isoflop.png
    assert {"data/", "out/", "hf/", "gguf/", "runs.png", "isoflop.png"} <= ignored
