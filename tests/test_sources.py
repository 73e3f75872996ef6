"""Model sources: a factory from user code, with weights from .safetensors or .pt."""

from __future__ import annotations

import concurrent.futures
import itertools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gpuserve.config import ModelSettings
from gpuserve.core.errors import ModelLoadError
from gpuserve.model.loading import load_model
from gpuserve.model.sources import (
    devices_named,
    import_object,
    layout_free_views,
    load_module,
    load_program,
    spec_from_program,
)

from .helpers import CPU as CPU_INFO

CPU = torch.device("cpu")
_modules = itertools.count()

FACTORY = """
import torch

def build(width=3):
    return torch.nn.Linear(width, 2)

def broken():
    raise RuntimeError("factory exploded")

def not_a_module():
    return 42

NOT_CALLABLE = 7
"""


@pytest.fixture
def code(tmp_path: Path) -> tuple[Path, str]:
    """A fresh module of user code in its own folder (fresh name: imports are cached)."""
    name = f"user_models_{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    return tmp_path, name


def factory(code: tuple[Path, str], attribute: str = "build", **fields: object) -> ModelSettings:
    folder, module = code
    return ModelSettings.model_validate(
        {"name": "m", "factory": f"{module}:{attribute}", "code_dir": folder, **fields}
    )


def trained(width: int = 3) -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Linear(width, 2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_factory_gets_its_weights_from_a_state_dict(
    code: tuple[Path, str], tmp_path: Path, suffix: str
) -> None:
    weights = tmp_path / f"weights{suffix}"
    state = trained().state_dict()
    if suffix == ".safetensors":
        save_file(state, str(weights))
    else:
        torch.save(state, str(weights))
    module = load_module(factory(code, weights=weights), CPU)
    x = torch.ones(1, 3)
    assert torch.equal(module(x), trained()(x))
    assert not module.training


def test_factory_arguments_are_passed(code: tuple[Path, str]) -> None:
    module = load_module(factory(code, factory_kwargs={"width": 5}), CPU)
    assert isinstance(module, torch.nn.Linear) and module.in_features == 5


def test_weights_that_do_not_fit_the_module_are_refused(
    code: tuple[Path, str], tmp_path: Path
) -> None:
    weights = tmp_path / "wide.safetensors"
    save_file(trained(width=4).state_dict(), str(weights))
    with pytest.raises(ModelLoadError, match=r"(?s)could not load weights .*size mismatch"):
        load_module(factory(code, weights=weights), CPU)


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("broken", "raised RuntimeError: factory exploded"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
        ("NOT_CALLABLE", "is not callable"),
        ("missing", "cannot import"),
    ],
)
def test_a_factory_that_cannot_build_is_a_clear_load_error(
    code: tuple[Path, str], attribute: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_module(factory(code, attribute), CPU)


def test_missing_or_unknown_weights_are_named(code: tuple[Path, str], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_module(factory(code, weights=tmp_path / "gone.safetensors"), CPU)
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"\x00")
    with pytest.raises(ModelLoadError, match=r"unknown weights format '\.h5'"):
        load_module(factory(code, weights=odd), CPU)


def test_a_pickle_that_is_not_only_weights_is_refused(
    code: tuple[Path, str], tmp_path: Path
) -> None:
    weights = tmp_path / "model.pt"
    torch.save(trained(), str(weights))  # a whole pickled module, not a state dict
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_module(factory(code, weights=weights), CPU)


def test_imports_name_the_folder_they_looked_in(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"from {tmp_path}"):
        import_object("no_such_module_here:build", tmp_path)


class WithConstants(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.tensor in forward becomes a constant baked into the exported graph.
        return self.layer(x) + self.offset + torch.tensor([1.0, 2.0])


def tensor_devices(module: torch.nn.Module) -> set[str]:
    found = {t.device.type for t in [*module.parameters(), *module.buffers()]}
    for sub in module.modules():
        found |= {v.device.type for v in vars(sub).values() if isinstance(v, torch.Tensor)}
    return found


def test_an_exported_program_moves_with_its_graph_constants(tmp_path: Path) -> None:
    path = tmp_path / "constants.pt2"
    exported(path, WithConstants(), torch.zeros(3, 2), dynamic=({0: torch.export.Dim("b")},))
    # The meta device stands in for a GPU: `.module().to(device)` left the constant behind.
    module = load_module(ModelSettings(path=path, name="c"), torch.device("meta"))
    assert tensor_devices(module) == {"meta"}


def test_several_exported_programs_load_at_once(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"m{i}.pt2")
        exported(
            paths[-1], WithConstants(), torch.zeros(3, 2), dynamic=({0: torch.export.Dim("b")},)
        )
    for _ in range(3):  # torch.export.load is not thread-safe: loads at once used to fail
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            loaded = list(
                pool.map(
                    lambda p: load_module(ModelSettings(path=p, name=p.stem), torch.device("cpu")),
                    paths,
                )
            )
        assert all(isinstance(m, torch.nn.Module) for m in loaded)


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Pair(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Tokens(torch.nn.Module):
    """Variable-length int64 ids to one float per position."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float() * 2


def exported(path: Path, module: torch.nn.Module, *args: torch.Tensor, **shapes: object) -> Path:
    program = torch.export.export(module.eval(), args, dynamic_shapes=shapes.get("dynamic"))
    torch.export.save(program, str(path))
    return path


def test_a_program_exported_with_a_fixed_batch_says_how_to_export_it(tmp_path: Path) -> None:
    path = exported(tmp_path / "fixed.pt2", Classifier(), torch.randn(1, 10))
    with pytest.raises(ModelLoadError) as caught:
        load_module(ModelSettings(path=path), CPU)
    message = caught.value.message
    assert "fixed batch size of 1" in message and "max_batch_size = 1" in message
    # The export the message gives is one that loads.
    call = message[message.index("torch.export.export(") :].split(", or set")[0]
    rebuilt = eval(call, {"torch": torch, "model": Classifier().eval()})
    torch.export.save(rebuilt, str(tmp_path / "dynamic.pt2"))
    module = load_module(ModelSettings(path=tmp_path / "dynamic.pt2"), CPU)
    assert module(torch.randn(7, 10)).shape == (7, 3)
    # Served one at a time, the fixed batch of 1 is what the model takes.
    assert load_module(ModelSettings(path=path, max_batch_size=1), CPU)(torch.ones(1, 10)).shape


def test_a_program_without_a_spec_is_served_with_the_spec_it_implies(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch")
    path = exported(tmp_path / "clf.pt2", Classifier(), torch.randn(2, 10), dynamic=({0: batch},))
    handler = load_model(ModelSettings(path=path, tune_batch_size=False), CPU_INFO)
    assert handler.spec.name == "clf"
    assert handler.spec.input.describe() == "float32[10]" and handler.spec.input.name == "x"
    assert handler.spec.output.describe() == "float32[3]"
    x = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    expected = Classifier()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.stack(handler(list(x))), expected, rtol=1e-6, atol=1e-6)


def test_dynamic_dimensions_of_an_inferred_spec_are_minus_one_with_their_bound(
    tmp_path: Path,
) -> None:
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=64)
    ids = torch.ones(2, 5, dtype=torch.int64)
    path = exported(tmp_path / "tok.pt2", Tokens(), ids, dynamic=({0: batch, 1: length},))
    program = load_program(path)
    spec = spec_from_program(program, "tok", path, 32)
    assert spec.input.shape == (-1,) and spec.input.max_shape == (64,)
    assert spec.input.dtype == "int64" and spec.output.shape == (-1,)


def test_a_program_of_variable_length_ids_alone_is_served_without_a_mask(
    tmp_path: Path,
) -> None:
    """Its one input is padded per batch; the program takes the ids alone."""
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=64)
    ids = torch.ones(2, 5, dtype=torch.int64)
    path = exported(tmp_path / "tok.pt2", Tokens(), ids, dynamic=({0: batch, 1: length},))
    handler = load_model(ModelSettings(path=path, tune_batch_size=False), CPU_INFO)
    assert handler.spec.input is not None and handler.spec.input.mask is False
    items = [np.array([1, 2, 3]), np.array([4]), np.arange(9)]
    for got, item in zip(handler(items), items, strict=True):
        np.testing.assert_allclose(got, item * 2.0)  # each its own length, not the padded one


def on_another_device(program_file: Path, out: Path, device: bytes) -> Path:
    """`program_file` as an export on `device` writes it: the device named in its weights'
    and graph's JSON, as torch.export.save records an export on a GPU."""
    with zipfile.ZipFile(program_file) as source, zipfile.ZipFile(out, "w") as copy:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(".json"):
                data = data.replace(b'{"type": "cpu", "index": null}', device)
            copy.writestr(info, data)
    return out


@pytest.mark.parametrize(
    ("device", "named"),
    [(b'{"type": "cuda", "index": 0}', "cuda:0"), (b'{"type": "cuda", "index": 3}', "cuda:3")],
)
def test_a_program_exported_on_a_gpu_says_so_where_there_is_none(
    tmp_path: Path, device: bytes, named: str
) -> None:
    batch = torch.export.Dim("batch")
    path = exported(tmp_path / "clf.pt2", Classifier(), torch.randn(2, 10), dynamic=({0: batch},))
    assert devices_named(path) == {"cpu"}
    gpu = on_another_device(path, tmp_path / "gpu.pt2", device)
    assert devices_named(gpu) == {named}
    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelSettings(path=gpu), CPU_INFO)
    message = caught.value.message
    assert f"was exported on {named}, which this machine does not have" in message
    assert "Export it from the CPU" in message and "not compiled" not in message


def test_a_program_of_two_inputs_has_both_in_its_inferred_spec(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch")
    a, b = torch.ones(2, 3), torch.ones(2, 3)  # two tensors: one passed twice is one input
    path = exported(tmp_path / "pair.pt2", Pair(), a, b, dynamic=({0: batch}, {0: batch}))
    model = load_model(ModelSettings(path=path), CPU_INFO)
    assert [(t.name, t.shape) for t in model.spec.input_specs] == [("a", (3,)), ("b", (3,))]
    instance = {"a": np.full(3, 1.0, dtype=np.float32), "b": np.full(3, 2.0, dtype=np.float32)}
    (row,) = model([instance])
    np.testing.assert_allclose(row, [3.0, 3.0, 3.0])


class Flatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().view(x.shape[0], -1) * 2


def test_an_exported_view_works_on_a_layout_other_than_the_traced_one(tmp_path: Path) -> None:
    path = exported(
        tmp_path / "flatten.pt2",
        Flatten(),
        torch.zeros(2, 3, 4),
        dynamic=({0: torch.export.Dim("b")},),
    )
    # Traced contiguous, export dropped the .contiguous(); a transposed tensor stands in for
    # a GPU kernel's output of another layout than the CPU's.
    other_layout = torch.arange(24.0).reshape(2, 4, 3).transpose(1, 2)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        torch.export.load(str(path)).module()(other_layout)
    module = load_module(ModelSettings(path=path, name="f"), CPU)
    assert torch.equal(module(other_layout), Flatten()(other_layout))


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_attention_exported_on_the_cpu_keeps_no_layout_bound_view(tmp_path: Path) -> None:
    # The case met on an H100: the CPU-traced program viewed attention's output as if it were
    # contiguous, and the GPU's was not.
    program = torch.export.export(
        Attention().eval(), (torch.randn(2, 5, 8),), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    assert any(n.target is torch.ops.aten.view.default for n in program.module().graph.nodes)
    torch.export.save(program, str(tmp_path / "attention.pt2"))
    module = load_module(ModelSettings(path=tmp_path / "attention.pt2", name="a"), CPU)
    views = [n for n in module.graph.nodes if n.target is torch.ops.aten.view.default]
    assert views == []
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), Attention().eval()(x), atol=1e-6)


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1
        flat = y.view(-1)
        flat.add_(1)  # writes through the view into y: the aliasing a reshape could break
        return y


def test_a_graph_that_writes_in_place_keeps_its_views() -> None:
    program = torch.export.export(InPlace(), (torch.zeros(2, 3),))
    module = program.module()
    assert layout_free_views(module) == 0
    assert torch.equal(module(torch.zeros(2, 3)), torch.ones(2, 3))
