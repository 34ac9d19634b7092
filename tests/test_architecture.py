"""The package's structure: no import cycles, no private names crossing modules, the model
contract kept by both kinds of model, the model above nothing of the evaluation suite."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import pytest

import dinofeat

ROOT = Path(dinofeat.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
        or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at module level or inside functions, except
    those under ``if TYPE_CHECKING:``: those never run, they only name types."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if _is_type_checking(node):
            for stmt in node.body:
                skipped.update(id(n) for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and id(n) not in skipped]


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "dinofeat")
                continue
            target = _target(name, path.name == "__init__.py", node)
            if target.split(".")[0] != "dinofeat":
                continue
            for a in node.names:  # "from . import images" names a module
                sub = f"{target}.{a.name}"
                deps.add(sub if sub in MODULES else target)
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v):
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if not state.get(m):
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_relative_imports():
    graph = _graph()
    assert "dinofeat.features" in graph["dinofeat.embedding"]  # from .features import ...
    assert "dinofeat.embedding" in graph["dinofeat.model"]  # inside a method
    assert "dinofeat.model" not in graph["dinofeat.export"]  # only under TYPE_CHECKING
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    """Module-level and function-level imports alike: a lazy import that closes a circle
    is still a circle (it only moves the failure to the first call)."""
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_does_not_sit_above_the_evaluations():
    graph = _graph()
    tree = ast.parse(MODULES["dinofeat.model"].read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {_target("dinofeat.model", False, n) for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(n.startswith("dinofeat.eval") for n in names)
    for low in ("dinofeat.model", "dinofeat.embedding", "dinofeat.features",
                "dinofeat.attention", "dinofeat.export"):
        ups = {d for d in graph[low] if d.startswith(("dinofeat.eval", "dinofeat.search",
                                                      "dinofeat.cli"))}
        # the one exception: the deprecated DinoModel.attach_classifier, when called
        assert ups <= ({"dinofeat.eval.linear"} if low == "dinofeat.model" else set()), low


def test_no_private_name_crosses_modules():
    crossings = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = set()  # names bound to dinofeat modules ("from . import images as _images")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(name, path.name == "__init__.py", node)
                if target.split(".")[0] != "dinofeat":
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        crossings.append(f"{name}:{node.lineno} imports {target}.{a.name}")
                    if f"{target}.{a.name}" in MODULES:
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("dinofeat") and a.asname:
                        aliases.add(a.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                crossings.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not crossings, "\n".join(crossings)


def test_no_design_document_cited():
    """Comments and docs explain in place; they never send the reader to the design brief,
    which is not part of the repository."""
    repo = ROOT.parent
    files = list(MODULES.values()) + [p for pattern in ("docs/*.md", "examples/*.py",
                                                        "README.md", "benchmarks/*.py")
                                      for p in repo.glob(pattern)]
    cited = [str(p.relative_to(repo)) for p in files if "DESIGN" in p.read_text()]
    assert not cited, f"files citing a document outside the repository: {cited}"


def test_both_models_keep_the_contract(tiny_vit_model):
    from dinofeat.export import OnnxModel
    from dinofeat.protocol import FeatureModel
    assert isinstance(tiny_vit_model, FeatureModel)
    # OnnxModel is checked on a real file in test_onnx_cli; here: it declares every
    # member of the protocol itself, not by pretending to be its own backbone
    members = [m for m in dir(FeatureModel) if not m.startswith("_")]
    for m in members:
        assert hasattr(OnnxModel, m) or m in ("name", "embed_dim", "patch_size",
                                              "preprocessing", "device", "depth",
                                              "source"), m
    src = inspect.getsource(OnnxModel)
    assert "self.backbone" not in src
    assert "type: ignore" not in inspect.getsource(dinofeat.model.load)


def test_attach_classifier_moved_with_a_deprecated_path(tiny_vit_model):
    import copy

    import torch

    from dinofeat.eval.linear import LinearClassifier, LinearProbe, attach_classifier
    head = LinearProbe(LinearClassifier(192, 3), ["a", "b", "c"])
    model = copy.deepcopy(tiny_vit_model)
    assert attach_classifier(model, head) is head and model.classifier is head
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.attach_classifier(head) is head
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    out = model.classify(torch.randn(2, 3, 32, 32), k=2)
    assert len(out) == 2 and len(out[0]) == 2


@pytest.fixture(scope="module")
def tiny_vit_model():
    import torch

    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                img_size=32)
    return DinoModel(vit, name="tiny", preprocessing=Preprocessing(resize_size=37,
                                                                   crop_size=32)).eval()
