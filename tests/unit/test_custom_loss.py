"""Server-side custom losses: the allowlist refuses at creation, naming the node, and nothing
refused ever runs; what is allowed evaluates like the SDK's own traced graph; sizes are bounded."""

from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

try:
    from tinkerd import loss_graph
except ModuleNotFoundError:  # not installed yet: import straight from the src layout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from tinkerd import loss_graph
from tinkerd.core.custom_losses import CustomLosses
from tinkerd.engine import custom_loss, losses
from tinkerd.loss_graph import CustomLossError, parse_loss
from tinkerd.types import UserError


def traced(fn, ranks: dict[str, int]) -> tuple[str, list[dict], dict]:
    """What the SDK uploads for `fn`: (name, inputs, graph) as JSON values."""
    handle = trace_loss(fn, ranks, "sess")
    return handle.name, [i.model_dump() for i in handle.inputs], json.loads(encode_graph(handle).model_dump_json())


def dpo(logprobs, chosen, rejected, ref_margin):
    margin = (logprobs * chosen).sum() - (logprobs * rejected).sum() - ref_margin
    return -F.logsigmoid(0.5 * margin), {"custom/accuracy:mean": (margin > 0).float(), "custom/margin:sum": margin.detach()}


DPO_RANKS = {"logprobs": 1, "chosen": 1, "rejected": 1, "ref_margin": 0}


def shaped_loss(logprobs, weights):
    n = logprobs.shape[0]
    x = torch.clamp(logprobs.exp(), max=4.0)[1:-1]
    y = torch.where(weights[1:-1] > 0, x, torch.zeros_like(x)).mean(dim=-1)
    steps = torch.arange(n, dtype=torch.float32, device=logprobs.device)
    total = torch.stack([y, (steps * weights).sum()]).sum() + F.softplus(logprobs).sum() + logprobs[..., None].sum()
    return total + torch.logsumexp(logprobs, dim=0), {"custom/first:sum": logprobs[0]}


def datum(n: int = 6) -> dict[str, torch.Tensor]:
    return {
        "target_tokens": torch.arange(n),
        "chosen": torch.tensor([1.0] * (n // 2) + [0.0] * (n - n // 2)),
        "rejected": torch.tensor([0.0] * (n // 2) + [1.0] * (n - n // 2)),
        "ref_margin": torch.tensor([0.3]),  # a rank-0 input comes off the wire with one value and no shape
        "weights": torch.linspace(0.5, 1.5, n),
    }


@pytest.mark.parametrize("fn, ranks", [(dpo, DPO_RANKS), (shaped_loss, {"logprobs": 1, "weights": 1})])
def test_the_rebuilt_loss_equals_the_sdks_traced_graph(fn, ranks):
    name, inputs, graph = traced(fn, ranks)
    compiled = custom_loss.compile_loss(parse_loss(name, inputs, graph))
    data = datum()
    compiled.check_datum(data, 6)
    lp = (-torch.rand(6, dtype=torch.float32) * 3).requires_grad_(True)
    ours = compiled(lp, data)
    ours.loss.backward()
    grad = lp.grad.clone()
    lp.grad = None
    handle = trace_loss(fn, ranks, "sess")
    args = [data[n].reshape(()) if ranks[n] == 0 else data[n] for n in handle.input_names]
    theirs, metrics = handle.graph(lp, *args)
    theirs.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()))
    assert torch.allclose(grad, lp.grad)
    assert ours.metrics == pytest.approx({"loss:sum": float(theirs.detach()), **{k: float(v.detach()) for k, v in metrics.items()}})


def test_a_loss_graph_is_plain_data_that_survives_pickling():
    graph = parse_loss(*traced(dpo, DPO_RANKS))
    again = pickle.loads(pickle.dumps(graph))
    assert again == graph
    lp = torch.full((6,), -1.0)
    assert float(custom_loss.compile_loss(again)(lp, datum()).loss) == float(custom_loss.compile_loss(graph)(lp, datum()).loss)


# -- refused at creation ---------------------------------------------------------------------


def graph_with(node: dict, *, inputs=None, extra_nodes=()) -> tuple[str, list, dict]:
    """A one-input graph whose middle node is `node` and whose loss is that node's value."""
    nodes = [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
        *extra_nodes,
        {"args": [], "kwargs": {}, **node},
        {"op": "output", "name": "output", "target": "output",
         "args": [{"tuple": [{"ref": node["name"]}, {"dict": {}}]}], "kwargs": {}},
    ]
    return "evil", inputs or [{"name": "logprobs", "rank": 1}], {"format": 1, "nodes": nodes}


def fn_node(target: str, *args, name: str = "bad", **kwargs) -> dict:
    return {"op": "call_function", "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def method_node(method: str, *args, name: str = "bad", **kwargs) -> dict:
    return {"op": "call_method", "name": name, "target": method, "args": [{"ref": "logprobs"}, *args], "kwargs": kwargs}


LP = {"ref": "logprobs"}


@pytest.mark.parametrize("node, message", [
    (fn_node("builtins.eval", "1+1"), "'builtins.eval' is not in this server's allowlist"),
    (fn_node("builtins.exec", "x=1"), "allowlist"),
    (fn_node("builtins.__import__", "os"), "allowlist"),
    (fn_node("importlib.import_module", "os"), "allowlist"),
    (fn_node("torch.load", "/etc/passwd"), "allowlist"),
    (fn_node("torch.save", LP, "/tmp/x"), "allowlist"),
    (fn_node("torch.outer", LP, LP), "allowlist"),
    (fn_node("torch.empty", 4), "allowlist"),  # uninitialised memory: another request's data
    (fn_node("operator.setitem", LP, 0, 1.0), "allowlist"),  # in place, into shared logprobs
    (fn_node("operator.iadd", LP, 1.0), "allowlist"),
    (fn_node("torch.exp", LP, out=LP), "out="),
    (fn_node("torch.nn.functional.relu", LP, inplace=True), "inplace"),
    (fn_node("torch.zeros_like", LP, device="cuda:7"), "device="),
    (fn_node("getattr", LP, "__class__"), "getattr may only read"),
    (fn_node("builtins.getattr", LP, "grad"), "getattr may only read"),
    (fn_node("getattr", LP, "data"), "getattr may only read"),
    (method_node("backward"), "'backward' is not in this server's allowlist"),
    (method_node("item"), "allowlist"),
    (method_node("tolist"), "allowlist"),
    (method_node("numpy"), "allowlist"),
    (method_node("register_hook", LP), "allowlist"),
    (method_node("__reduce_ex__", 2), "allowlist"),
    (method_node("add_", 1.0), "allowlist"),
    (method_node("requires_grad_"), "allowlist"),
    (method_node("to", "cuda:7"), "device name"),
    ({"op": "call_module", "name": "bad", "target": "linear"}, "calls a module"),
    ({"op": "get_attr", "name": "bad", "target": "_tensor_constant0"}, "captured tensor"),
    ({"op": "eval", "name": "bad", "target": "x"}, "op 'eval' is not allowed"),
    (fn_node("torch.exp", {"ref": "later"}), "before it is computed"),
    (fn_node("torch.exp", {"lambda": "x"}), "not a value this server reads"),
    (fn_node("torch.exp", {"dtype": "object"}), "not a value this server reads"),
    (fn_node("torch.add", LP, 2**70), "outside int64"),
])
def test_a_forbidden_node_is_refused_by_name(node, message):
    with pytest.raises(CustomLossError, match=message) as refused:
        parse_loss(*graph_with(node))
    assert "node 'bad'" in str(refused.value)
    assert isinstance(refused.value, UserError)  # a 400 with this text


def test_a_refused_target_is_never_called(tmp_path):
    """A graph naming functions with side effects is refused at creation, and the engine's own
    check refuses the same data however it was made: the files are never created."""
    opened, touched = tmp_path / "opened", tmp_path / "touched"
    hostile = [fn_node("builtins.open", str(opened), "w"), fn_node("os.system", f"touch {touched}"),
               fn_node("subprocess.run", {"tuple": ["touch", str(touched)]})]
    for node in hostile:
        with pytest.raises(CustomLossError, match="node 'bad'"):
            parse_loss(*graph_with(node))
        # The same graph as data, built without parse_loss, still never runs.
        ok = parse_loss(*graph_with(fn_node("torch.exp", LP)))
        forged = loss_graph.LossGraph(ok.name, ok.inputs, (
            ok.nodes[0],
            loss_graph.Node("call_function", "bad", node["target"], tuple(
                loss_graph.Seq("tuple", tuple(a["tuple"])) if isinstance(a, dict) else a for a in node["args"]), ()),
            ok.nodes[2]), ok.loss, ok.metrics)
        with pytest.raises(CustomLossError, match="node 'bad'"):
            custom_loss.compile_loss(forged)
        with pytest.raises(CustomLossError):
            losses.validate_loss_request("custom", {"graph": forged})
    assert not opened.exists() and not touched.exists()


@pytest.mark.parametrize("change, message", [
    (lambda n, i, g: (n, [{"name": "Logprobs", "rank": 1}], g), "first input must be logprobs"),
    (lambda n, i, g: (n, [{"name": "logprobs", "rank": 0}], g), "rank 1"),
    (lambda n, i, g: (n, [{"name": "logprobs", "rank": 3}], g), "ranks are 0, 1 or 2"),
    (lambda n, i, g: (n, i + [{"name": "Bad-Name", "rank": 1}], g), "placeholder|lowercase"),
    (lambda n, i, g: (n, [{"name": "logprobs", "rank": 1}] + [{"name": f"x{k}", "rank": 1} for k in range(16)], g),
     "at most 16"),
    (lambda n, i, g: (n, i, {"format": 2, "nodes": g["nodes"]}), "format: 1"),
    (lambda n, i, g: (n, i, {"format": 1, "nodes": g["nodes"][:-1]}), "last node must be its output"),
])
def test_malformed_definitions_are_refused(change, message):
    with pytest.raises(CustomLossError, match=message):
        parse_loss(*change(*graph_with(fn_node("torch.exp", LP))))


def test_outputs_must_be_a_loss_and_well_named_scalar_metrics():
    name, inputs, graph = graph_with(fn_node("torch.exp", LP))
    graph["nodes"][-1]["args"] = [{"tuple": [{"ref": "bad"}, {"dict": {"accuracy": {"ref": "bad"}}}]}]
    with pytest.raises(CustomLossError, match="node 'output'.*custom/<name>:sum"):
        parse_loss(name, inputs, graph)
    graph["nodes"][-1]["args"] = [{"ref": "bad"}]
    with pytest.raises(CustomLossError, match="must return \\(loss, metrics\\)"):
        parse_loss(name, inputs, graph)


def test_a_graph_past_the_node_limit_is_refused():
    chain = [fn_node("torch.exp", {"ref": "logprobs" if k == 0 else f"n{k - 1}"}, name=f"n{k}")
             for k in range(loss_graph.MAX_NODES)]
    with pytest.raises(CustomLossError, match=f"more than {loss_graph.MAX_NODES}"):
        parse_loss(*graph_with(fn_node("torch.exp", {"ref": chain[-1]["name"]}), extra_nodes=chain))


def test_every_allowlisted_name_is_bound_in_the_engine():
    missing = [name for name in loss_graph.FUNCTIONS if name not in custom_loss._CALLABLES]
    assert not missing
    assert set(custom_loss._METHODS) == set(loss_graph.METHODS)


# -- bounded at run time ---------------------------------------------------------------------


def checked(node: dict, n: int = 512, extra_nodes=()) -> None:
    compiled = custom_loss.compile_loss(parse_loss(*graph_with(node, extra_nodes=extra_nodes)))
    compiled.check_datum({"target_tokens": torch.zeros(n, dtype=torch.long)}, n)


def test_sizes_past_the_datums_bound_are_refused_before_they_are_allocated():
    rows = fn_node("operator.getitem", LP, {"tuple": [{"slice": [None, None, None]}, None]}, name="rows")
    cols = fn_node("operator.getitem", LP, {"tuple": [None, {"slice": [None, None, None]}]}, name="cols")
    with pytest.raises(CustomLossError, match="node 'bad'.*262144 elements, more than this datum's bound"):
        checked(fn_node("operator.sub", {"ref": "rows"}, {"ref": "cols"}), extra_nodes=[rows, cols])
    with pytest.raises(CustomLossError, match="node 'bad'.*bound"):
        checked(fn_node("torch.zeros", 10**12))  # would be 4 TB; never allocated
    with pytest.raises(CustomLossError, match="node 'bad'.*bound"):
        checked(method_node("expand", 10**6, 512))
    # A small datum still has room for a modest [T, T] (MIN_NODE_ELEMENTS).
    pairs = fn_node("operator.sub", {"ref": "rows"}, {"ref": "cols"}, name="pairs")
    checked(fn_node("torch.sum", {"ref": "pairs"}), n=64, extra_nodes=[rows, cols, pairs])


def test_python_values_cannot_blow_up():
    shape = fn_node("getattr", LP, "shape", name="shape")
    with pytest.raises(CustomLossError, match="node 'bad'.*operators take tensors and numbers"):
        checked(fn_node("operator.mul", {"ref": "shape"}, 10**9), extra_nodes=[shape])  # a tuple repeated 10**9 times
    with pytest.raises(CustomLossError, match="node 'bad'.*exponent"):
        checked(fn_node("operator.pow", 10, 10**9))
    total = fn_node("torch.sum", LP, name="total")
    with pytest.raises(CustomLossError, match="node 'bad'.*sizes as Python numbers"):
        checked(fn_node("torch.arange", {"ref": "total"}), extra_nodes=[total])


def test_datum_errors_surface_before_any_pass():
    compiled = custom_loss.compile_loss(parse_loss(*traced(dpo, DPO_RANKS)))
    good = datum()
    compiled.check_datum(good, 6)
    with pytest.raises(CustomLossError, match="loss_fn_inputs\\['chosen'\\], which is missing"):
        compiled.check_datum({k: v for k, v in good.items() if k != "chosen"}, 6)
    with pytest.raises(CustomLossError, match="declared rejected with rank 1"):
        compiled.check_datum({**good, "rejected": torch.zeros(6, 2)}, 6)
    with pytest.raises(CustomLossError, match="node 'mul'.*failed"):
        compiled.check_datum({**good, "chosen": torch.zeros(5)}, 6)
    with pytest.raises(CustomLossError, match="target_tokens must be integers of that rank"):
        compiled.check_datum({**good, "target_tokens": torch.zeros(6, 2, dtype=torch.long)}, 6)

    def per_token(logprobs):
        return -logprobs, {}

    vector = custom_loss.compile_loss(parse_loss(*traced(per_token, {"logprobs": 1})))
    with pytest.raises(CustomLossError, match="must return a scalar float loss"):
        vector.check_datum(good, 6)


# -- through the loss table and the session store --------------------------------------------


def test_custom_plugs_into_the_loss_table():
    graph = parse_loss(*traced(dpo, DPO_RANKS))
    config = losses.validate_loss_request("custom", {"graph": graph})
    losses.validate_datum_inputs("custom", datum(), 6, config)
    lp = torch.full((6,), -1.0, requires_grad=True)
    result = losses.compute_datum_loss("custom", lp, datum(), config)
    assert set(result.metrics) == {"loss:sum", "custom/accuracy:mean", "custom/margin:sum"}
    with pytest.raises(UserError, match="create_custom_loss"):
        losses.validate_loss_request("custom", {"loss_id": "abc"})


def test_losses_belong_to_their_session():
    store = CustomLosses()
    definition = traced(dpo, DPO_RANKS)
    loss_id = store.create("sess-a", 0, *definition)
    assert store.create("sess-a", 0, *copy.deepcopy(definition)) == loss_id  # the SDK's retry
    with pytest.raises(UserError, match="already names another loss"):
        store.create("sess-a", 0, *traced(shaped_loss, {"logprobs": 1, "weights": 1}))
    assert store.graph_for(loss_id, "sess-a").name == "dpo"
    for bad_id, session in ((loss_id, "sess-b"), ("sess-a:loss:9", "sess-a"), (None, "sess-a")):
        with pytest.raises(UserError, match="loss_id"):
            store.graph_for(bad_id, session)
    store.drop_session("sess-a")
    with pytest.raises(UserError, match="unknown loss_id"):
        store.graph_for(loss_id, "sess-a")


def test_the_client_config_flag_follows_the_serve_option():
    from unittest.mock import MagicMock

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tinkerd.api.tinker_routes import build_router
    from tinkerd.cli import build_parser

    for args, server_side in (([], True), (["--client-side-custom-losses"], False)):
        parsed = build_parser().parse_args(["serve", *args])
        app = FastAPI()
        app.include_router(build_router(MagicMock(), 1.0,  # client/config reads no state
                                        custom_loss_server_side=not parsed.client_side_custom_losses))
        assert TestClient(app).post("/api/v1/client/config").json()["custom_loss_server_side"] is server_side
