"""Security (issue 9): network endpoints bind to 127.0.0.1 unless configured otherwise; YAML is
loaded safely; checkpoints with ``weights_only=True``; nothing unpickles untrusted data; model
metadata is parsed defensively (fuzzed: only ``MetadataError``, never another exception)."""

from __future__ import annotations

import ast
import inspect
import json
import socket
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.infer.metadata import MetadataError, ModelMetadata
from node.node_config import DEFAULT_CONFIG, NodeConfig, load_node_config

REPO = Path(__file__).resolve().parents[2]
PROJECT_FOLDERS = ("node", "export", "calib", "launch", "tests")


# ---- endpoints ----------------------------------------------------------------------------

def test_zeromq_binds_to_loopback_by_default():
    zmq = pytest.importorskip("zmq")
    from node.publish.publishers import ZmqPublisher

    default = inspect.signature(ZmqPublisher).parameters["endpoint"].default
    assert default.startswith("tcp://127.0.0.1:")
    assert NodeConfig().publishers.zmq is None  # off unless asked for
    assert load_node_config(REPO / DEFAULT_CONFIG).publishers.zmq is None
    publisher = ZmqPublisher("tcp://127.0.0.1:0")
    try:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        context = zmq.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.connect(publisher.endpoint)
        assert sub.getsockopt(zmq.TYPE) == zmq.SUB
        sub.close(0)
    finally:
        publisher.close()


def test_prometheus_listens_on_loopback_by_default():
    from node.cli.common import _build_tracker
    from node.publish.metrics import PrometheusExporter

    assert inspect.signature(PrometheusExporter).parameters["host"].default == "127.0.0.1"
    shipped = load_node_config(REPO / DEFAULT_CONFIG).metrics
    assert shipped.prometheus_host == NodeConfig().metrics.prometheus_host == "127.0.0.1"
    assert shipped.prometheus_port is None  # off unless asked for
    with socket.socket() as probe:  # a free port (config ports start at 1)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracker, exporter = _build_tracker(load_node_config(None, {"metrics": {
        "prometheus_port": port}}))
    try:
        assert (exporter.host, exporter.port) == ("127.0.0.1", port)
        tracker.record({"total": 5.0})
        with urllib.request.urlopen(exporter.url, timeout=5) as response:
            assert "cone_node_frames_total 1" in response.read().decode()
    finally:
        exporter.close()


def test_no_endpoint_in_the_project_binds_every_interface_by_default():
    offenders = []
    for path in project_files((".py", ".yaml", ".sh", ".service")):
        if path.is_relative_to(REPO / "tests"):
            continue
        text = path.read_text(errors="replace")
        for needle in ("0.0.0.0", "tcp://*"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


# ---- unsafe deserialisation ---------------------------------------------------------------

def project_files(suffixes: tuple[str, ...]) -> list[Path]:
    files = []
    for folder in PROJECT_FOLDERS:
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in suffixes and p.is_file()
                  and "__pycache__" not in p.parts]
    return files


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can run code from a file: yaml.load without a safe loader, unsafe/full
    YAML loads, pickle/marshal/dill/joblib loads, np.load(allow_pickle=True), torch.load
    without weights_only=True."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        attr = node.func.attr
        if owner == "yaml" and attr == "load":
            loader = _keyword(node, "Loader")
            loader_name = getattr(loader, "attr", getattr(loader, "id", None))
            if loader_name not in ("SafeLoader", "CSafeLoader"):
                found.append((node.lineno, "yaml.load without SafeLoader"))
        elif owner == "yaml" and attr in ("unsafe_load", "full_load", "load_all",
                                          "unsafe_load_all", "full_load_all"):
            found.append((node.lineno, f"yaml.{attr}"))
        elif owner in ("pickle", "cPickle", "dill", "marshal", "joblib", "cloudpickle") and \
                attr in ("load", "loads"):
            found.append((node.lineno, f"{owner}.{attr}"))
        elif owner in ("np", "numpy") and attr == "load" and \
                _is_true(_keyword(node, "allow_pickle")):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        elif owner == "torch" and attr == "load" and \
                not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
    return found


def test_the_scanner_catches_each_unsafe_form():
    code = ("yaml.load(f)\nyaml.load(f, Loader=yaml.FullLoader)\nyaml.unsafe_load(f)\n"
            "pickle.load(f)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\ntorch.load(p)\n"
            "torch.load(p, weights_only=False)\n"
            "yaml.safe_load(f)\nyaml.load(f, Loader=yaml.SafeLoader)\nnp.load(p)\n"
            "torch.load(p, map_location='cpu', weights_only=True)\n")
    assert [line for line, _ in unsafe_calls(ast.parse(code))] == [1, 2, 3, 4, 5, 6, 7, 8]


DELIBERATE = {"tests/reliability/test_security.py": ["torch.load without weights_only=True"]}
"""The one unsafe load on purpose: proving the payload below is live."""


def test_nothing_in_the_project_loads_yaml_or_checkpoints_unsafely():
    offenders = []
    for path in project_files((".py",)):
        tree = ast.parse(path.read_text(), filename=str(path))
        name = path.relative_to(REPO).as_posix()
        found = [what for _, what in unsafe_calls(tree)]
        if found != DELIBERATE.get(name, []):
            offenders += [f"{name}:{line}: {what}" for line, what in unsafe_calls(tree)]
    assert offenders == []


_PAYLOAD_RAN: list[str] = []


def _payload() -> list:
    _PAYLOAD_RAN.append("ran")
    return []


class _Exploit:
    """Unpickles by calling ``_payload``, as a malicious checkpoint would call os.system."""

    def __reduce__(self):
        return (_payload, ())


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    torch = pytest.importorskip("torch")
    train = pytest.importorskip("export.train")
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": "x", "classes": ["blue_cone"], "input_size": 32,
                "hook": _Exploit()}, path)
    with pytest.raises(train.CheckpointError, match=r"evil.pt: not a loadable checkpoint"):
        train.load_checkpoint(path)
    assert _PAYLOAD_RAN == []
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert _PAYLOAD_RAN == ["ran"]


# ---- model metadata, fuzzed -----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=20)
KEYS = list(ModelMetadata.__dataclass_fields__)
GOOD = json.loads(ModelMetadata(classes=["blue_cone", "background"], input_size=32).to_json())


def parse(text) -> ModelMetadata | None:
    try:
        return ModelMetadata.from_json(text, origin="fuzz.onnx")
    except MetadataError as exc:
        message = str(exc)
        assert message.startswith("fuzz.onnx: ") and "\n" not in message.strip()
        return None


@settings(deadline=None, max_examples=300)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_metadata_from_any_text_is_parsed_or_a_metadata_error(text):
    parse(text)


@settings(deadline=None, max_examples=300)
@given(data=st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=len(KEYS)))
def test_metadata_with_any_values_under_its_keys_is_parsed_or_a_metadata_error(data):
    parse(json.dumps(data))


@settings(deadline=None, max_examples=300)
@given(key=st.sampled_from(KEYS), value=JSON_VALUES)
def test_one_corrupted_field_of_good_metadata_is_caught_or_harmless(key, value):
    meta = parse(json.dumps({**GOOD, key: value}))
    if meta is not None:  # accepted: then it is usable as the node uses it
        assert isinstance(meta.classes, list) and all(isinstance(c, str) for c in meta.classes)
        assert isinstance(meta.extra, dict) and isinstance(meta.crop, dict)
        meta.crop_policy.square_boxes([[0, 0, 1, 1]])


@pytest.mark.parametrize("bad", [
    "[" * 100_000 + "]" * 100_000,                               # absurd nesting
    '{"classes": "blue_cone", "input_size": 32}',                # a string is not a list
    '{"classes": {"blue_cone": 0}, "input_size": 32}',
    '{"classes": ["blue_cone"], "input_size": true}',
    '{"classes": ["blue_cone"], "input_size": 32, "mean": [NaN, 0.4, 0.4]}',
    '{"classes": ["blue_cone"], "input_size": 32, "std": [Infinity, 0.2, 0.2]}',
    '{"classes": ["blue_cone"], "input_size": 32, "extra": []}',
    '{"classes": ["blue_cone"], "input_size": 32, "crop": {"min_side": Infinity}}',
    '{"classes": ["blue_cone"], "input_size": 32, "crop": "context=0.1"}',
    '{"classes": ["blue_cone"], "input_size": 32, "secret": 1}',
])
def test_malformed_metadata_that_used_to_slip_through_is_refused(bad):
    with pytest.raises(MetadataError, match=r"^fuzz.onnx: "):
        ModelMetadata.from_json(bad, origin="fuzz.onnx")
