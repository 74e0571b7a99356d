"""The package's import structure, read from the source (nothing is imported): no module imports itself around a loop,
and the remote-code files stay a flat set that imports only torch, transformers and each other."""

import ast
import sys

from conftest import REPO_ROOT


PACKAGE = "hf_fusedvlm"
# The files `save_pretrained` copies into a checkpoint for `trust_remote_code=True`.
REMOTE_CODE = {
    f"{kind}_fused_{family}"
    for kind in ("configuration", "modeling", "processing")
    for family in ("llava", "llava_next")
}
# Third-party packages remote code may import: transformers and the packages transformers itself requires.
REMOTE_CODE_DEPENDENCIES = {"torch", "transformers", "huggingface_hub", "safetensors"}


def package_modules() -> dict[str, tuple]:
    """`{module name: (path, is_package)}` of every module of the package."""
    modules = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imports_of(name: str, path, is_package: bool) -> list[tuple[str, int]]:
    """`(imported module, level)` for every import statement of a module, relative ones resolved to absolute names
    (`from .a import b` gives `pkg.a` and `pkg.a.b`, whichever exists); imports inside functions and under
    `TYPE_CHECKING` count too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            found.append((base, node.level))
            found += [(f"{base}.{alias.name}", node.level) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """Which package modules each package module imports. Importing `pkg.sub.mod` also runs `pkg.sub/__init__.py`,
    so that counts as an import of `pkg.sub` too, unless `pkg.sub` is a package the importer itself belongs to
    (Python imports those before it)."""
    modules = package_modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        own_packages = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        targets = set()
        for imported, _ in imports_of(name, path, is_package):
            if imported not in modules:
                continue
            targets.add(imported)
            parents = {imported.rsplit(".", depth)[0] for depth in range(1, imported.count(".") + 1)}
            targets |= parents - own_packages
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_sees_a_loop_through_a_package_init():
    graph = {"p": {"p.a"}, "p.a": {"p.b.c", "p.b"}, "p.b": {"p.b.c"}, "p.b.c": {"p.a"}, "p.d": set()}
    assert cycles(graph) == [["p.a", "p.b", "p.b.c"]]
    assert cycles({"p": {"p.a"}, "p.a": set()}) == []


def test_no_module_of_the_package_imports_itself_around_a_loop():
    graph = import_graph()
    assert len(graph) > 40 and "hf_fusedvlm.parity" in graph["hf_fusedvlm.tiny"]
    assert cycles(graph) == []


def remote_code_closure(start: set[str]) -> set[str]:
    """The top-level modules the relative imports of `start` reach, as transformers follows them when it copies
    remote code (`get_relative_import_files`)."""
    modules = package_modules()
    reached, pending = set(), list(start)
    while pending:
        module = pending.pop()
        if module in reached:
            continue
        reached.add(module)
        name = f"{PACKAGE}.{module}"
        for imported, level in imports_of(name, *modules[name]):
            if level and imported in modules:
                pending.append(imported.removeprefix(f"{PACKAGE}."))
    return reached


def test_remote_code_is_flat_and_imports_only_torch_transformers_and_itself():
    remote = remote_code_closure(REMOTE_CODE)
    assert remote == REMOTE_CODE | {
        "modeling_fusion",
        "checkpoint_checks",
        "fusers",
        "fuser_registry",
        "deformable_attention",
    }
    modules = package_modules()
    for module in remote:
        name = f"{PACKAGE}.{module}"
        for imported, level in imports_of(name, *modules[name]):
            if level:
                if imported in modules:  # a module, not a name imported from one
                    assert imported.count(".") == 1 and imported.removeprefix(f"{PACKAGE}.") in remote, (
                        f"{module} imports {imported}, which is not a flat remote-code file"
                    )
            else:
                top = imported.split(".")[0]
                assert top in sys.stdlib_module_names or top in REMOTE_CODE_DEPENDENCIES, (module, imported)


def test_the_configuration_and_the_processor_read_the_registry_without_the_fuser_modules():
    """They import the torch-free registry only, so loading a config or a processor builds no fuser code."""
    assert remote_code_closure({"configuration_fused_llava"}) == {"configuration_fused_llava", "fuser_registry"}
    assert remote_code_closure({"processing_fused_llava"}) == {"processing_fused_llava", "fuser_registry"}
    modules = package_modules()
    name = f"{PACKAGE}.fuser_registry"
    assert {imported.split(".")[0] for imported, level in imports_of(name, *modules[name]) if not level} <= {
        "dataclasses",
        "typing",
        "transformers",  # only under TYPE_CHECKING, for annotations
    }
