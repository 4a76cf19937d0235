"""The shape of the house (issue 16's bars): small functions, few positional parameters, one
direction of dependency. Read from the source, not run."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted([*ROOT.glob("bsa_flex/**/*.py"), *ROOT.glob("masks/*.py")])


def functions():
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def test_no_library_function_is_longer_than_40_lines():
    long = [name for name, node in functions() if node.end_lineno - node.lineno + 1 > 40]
    assert not long, long


def test_no_library_function_takes_more_than_6_positional_parameters():
    many = [name for name, node in functions() if len(node.args.posonlyargs) + len(node.args.args) > 6]
    assert not many, many


def test_masks_never_imports_bsa_flex():
    imports = [path.name for path in ROOT.glob("masks/*.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))
               and any((alias.name if isinstance(node, ast.Import) else node.module or "").startswith("bsa_flex")
                       for alias in getattr(node, "names", []))]
    assert not imports, imports


def test_the_operator_module_holds_no_runtime():
    """attention.py is the paper's steps: no compiling, warnings or dynamo state in it."""
    source = (ROOT / "bsa_flex" / "attention.py").read_text()
    assert not any(word in source for word in ("torch.compile", "import warnings", "_dynamo", "torch.compiler"))
