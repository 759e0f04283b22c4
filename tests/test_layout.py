"""The house rules of issue 9, checked on the source: imports go one way (a DAG by floors), project imports sit
at the top of each file, and the product files hold no import of a file on their own floor or above."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"data": set(), "cotgen": {"data"}, "verifiers": {"data"}, "dpo": {"data", "cotgen"},
           "sample": {"data", "cotgen", "verifiers", "dpo"}, "train": {"data", "cotgen", "verifiers", "dpo", "sample"}}


def imports(name: str) -> tuple[set[str], list[int]]:
    """(project modules `name`.py imports, line numbers of any import not at the top of the file)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    top = {id(n) for n in tree.body}
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module.split(".")[0]]
        else:
            continue
        if id(node) not in top:
            nested.append(node.lineno)
        found |= {m for m in mods if m in ALLOWED}
    return found, nested


def test_imports_follow_the_floors_and_sit_at_the_top():
    for name, allowed in ALLOWED.items():
        found, nested = imports(name)
        assert found <= allowed, f"{name}.py imports {sorted(found - allowed)}"
        assert not nested, f"{name}.py imports inside functions at lines {nested}"


def test_the_import_graph_has_no_cycle():
    graph = {name: imports(name)[0] for name in ALLOWED}
    done: set[str] = set()

    def visit(node, path):
        assert node not in path, f"import cycle {' -> '.join(path + [node])}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, path + [node])
            done.add(node)

    for name in graph:
        visit(name, [])
    assert "verifiers" not in graph["cotgen"] and "cotgen" not in graph["verifiers"]   # side by side on floor 2
