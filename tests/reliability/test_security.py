"""Untrusted files never run code: a source scan for unsafe calls, planted pickles, hostile manifests.

Backs the claims in SECURITY.md.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchslim as ts
from torchslim.cli.main import main
from torchslim.errors import ArtifactError
from torchslim.testing import tiny_mlp

SRC = Path(ts.__file__).parent

# Files allowed to import a module named at run time, and why that is safe. A new entry needs the same
# kind of reason: the name comes from a fixed table in our code, or is checked against an allowlist or
# trust_factory=True before the import.
DYNAMIC_IMPORTS = {
    "__init__.py": "lazy public exports from the fixed _EXPORTS table",
    "kernels/__init__.py": "lazy exports from a fixed table",
    "onnx/runtime.py": "optional dependencies by fixed name",
    "models/registry.py": "model factories: allowlisted prefixes or trust_factory=True; scheme back-ends from the "
    "fixed SCHEME_PROVIDERS table",
    "artifact/slim.py": "codecs: torchslim.* modules or trust_factory=True",
}

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    """``torch.jit.load`` for the call's function expression ('' when not a plain dotted name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, relative: str) -> list[str]:
    """Every construct in ``source`` that could run code taken from a file, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{relative}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNPICKLERS:
                    found.append(f"{where}: imports {name} (unpickling runs code)")
            if isinstance(node, ast.ImportFrom) and node.module == "importlib" and relative not in DYNAMIC_IMPORTS:
                if any(a.name == "import_module" for a in node.names):
                    found.append(f"{where}: dynamic import outside the reviewed files")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {name}() runs code from data")
        elif name in ("os.system", "os.popen") or (
            name.startswith("subprocess.") and _is_const(_keyword(node, "shell"), True)
        ):
            found.append(f"{where}: {name} runs a shell command")
        elif name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True unpickles arbitrary objects")
        elif name in ("torch.jit.load", "torch.package.PackageImporter", "torch.export.load"):
            found.append(f"{where}: {name} can run code from the file")
        elif name in ("np.load", "numpy.load") and not _is_const(_keyword(node, "allow_pickle"), False):
            found.append(f"{where}: {name} without allow_pickle=False")
        elif name.startswith("yaml.") and last in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
            found.append(f"{where}: {name} can build arbitrary objects: use yaml.safe_load")
        elif last == "import_module" and relative not in DYNAMIC_IMPORTS:
            found.append(f"{where}: dynamic import outside the reviewed files (see DYNAMIC_IMPORTS)")
    return found


def test_no_source_file_can_run_code_taken_from_a_file():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    problems = []
    for file in files:
        relative = file.relative_to(SRC).as_posix()
        problems += unsafe_calls(file.read_text(encoding="utf-8"), relative)
    assert problems == [], "\n".join(problems)
    assert set(DYNAMIC_IMPORTS) <= {f.relative_to(SRC).as_posix() for f in files}  # no stale entries


@pytest.mark.parametrize(
    "snippet",
    [
        "eval(text)",
        "exec(code)",
        "compile(s, 'f', 'exec')",
        "__import__(name)",
        "import pickle",
        "from pickle import loads",
        "import dill",
        "import marshal",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.jit.load(path)",
        "np.load(path)",
        "np.load(path, allow_pickle=True)",
        "yaml.load(text)",
        "yaml.unsafe_load(text)",
        "importlib.import_module(name)",
        "from importlib import import_module",
        "os.system(cmd)",
        "subprocess.run(cmd, shell=True)",
    ],
)
def test_the_scan_catches_each_unsafe_construct(snippet):
    assert unsafe_calls(snippet, "quantize/new.py") != []


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(path, allow_pickle=False)",
        "yaml.safe_load(text)",
        "model.eval()",
        "subprocess.run([sys.executable, '-c', code])",
    ],
)
def test_the_scan_accepts_the_safe_forms(snippet):
    assert unsafe_calls(snippet, "quantize/new.py") == []


# --- planted files ---------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"weights": torch.zeros(2), "payload": _RunsCode(marker)}, path)


def test_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    # The control: the planted file is a working exploit for anyone calling torch.load(weights_only=False).
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _plant_pickle(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.slim", "evil.pt"])
def test_planted_pickle_is_refused_by_every_reader_and_runs_nothing(tmp_path, capsys, name):
    path, marker = tmp_path / name, tmp_path / "pwned"
    _plant_pickle(path, marker)
    for reader in (ts.load, ts.read_manifest, ts.artifact.tensor_table):
        with pytest.raises(ArtifactError, match="pickle or torch.save checkpoint, which torchslim never unpickles"):
            reader(path)
    assert main(["inspect", str(path)]) == 2
    assert "error:" in capsys.readouterr().err
    # torch.load with weights_only=True (how train() reads checkpoints) refuses it as well
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def _slim_with(tmp_path: Path, edit) -> Path:
    path = ts.save(tiny_mlp(), tmp_path / "m.slim")
    stored = safetensors.torch.load(path.read_bytes())
    manifest = ts.read_manifest(path)
    edit(manifest)
    path.write_bytes(safetensors.torch.save(stored, metadata={"torchslim": json.dumps(manifest)}))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # code hidden in a string is data: it is passed as a value, never evaluated
        (
            lambda m: m["factory"]["kwargs"].update(hidden="__import__('os').system('touch {marker}')"),
            "cannot rebuild the model from factory",
        ),
        (
            lambda m: m.update(factory={"name": "os:system", "kwargs": {"command": "touch {marker}"}}),
            "outside the allowlist",
        ),
        (
            lambda m: m.update(factory={"name": "subprocess:getoutput", "kwargs": {"cmd": "touch {marker}"}}),
            "outside the allowlist",
        ),
        (
            lambda m: m["modules"].update({"1": {"codec": "os:system", "spec": {"command": "touch {marker}"}}}),
            "needs codec 'os:system', which is not registered.*trust_factory=True",
        ),
    ],
)
def test_hostile_manifest_runs_no_code(tmp_path, edit, message):
    marker = tmp_path / "pwned"

    def plant(manifest):
        edit(manifest)
        text = json.dumps(manifest).replace("{marker}", str(marker))
        manifest.clear()
        manifest.update(json.loads(text))

    path = _slim_with(tmp_path, plant)
    with pytest.raises(ArtifactError, match=message):
        ts.load(path)
    assert not marker.exists()


def test_trusted_factory_outside_the_allowlist_loads_only_with_trust(tmp_path):
    model = tiny_mlp()
    path = ts.save(model, tmp_path / "m.slim", factory={"name": "torchslim.testing:tiny_mlp", "kwargs": {}})
    with pytest.raises(ArtifactError, match="'torchslim.testing:tiny_mlp' is outside the allowlist"):
        ts.load(path)
    loaded = ts.load(path, trust_factory=True)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_onnx_graph_cannot_read_files_through_external_data(tmp_path):
    # ONNX graphs stored in .slim files reach ONNX Runtime as bytes; a tensor pointing at an external file
    # (an attempt to read e.g. a secret into the model's outputs) must be refused, whatever the path form.
    import onnx

    from torchslim.errors import TorchSlimError
    from torchslim.onnx.runtime import ort_session

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRETSECR")
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(secret)), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [tensor],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    for location in (str(secret), "secret.bin", "../" * 8 + str(secret).lstrip("/")):
        model.graph.initializer[0].external_data[0].value = location
        with pytest.raises(TorchSlimError, match="onnxruntime cannot load the ONNX graph"):
            ort_session(model.SerializeToString())
