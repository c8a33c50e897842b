"""Import of the authors' frozen TensorFlow graphs into our Keras models, and parity checks against the graphs.

Frozen graphs: local ``loc.pb`` / ``contextdesc-*.pb`` (``input:0`` -> ``conv6_feat:0``, ``kpt_mb:0``), augmentation
``aug.pb`` / ``contextdesc-*-aug.pb`` (``input/local_feat:0``, ``input/regional_feat:0``, ``input/kpt_m:0``,
``input/kpt_xy:0`` -> ``l2norm:0``), regional ``retrieval_resnet50.pb`` (``input:0`` -> ``res5c:0``).

How the constants are found: the graph is walked from its interface tensors. Every *parameter op* (``Conv2D``,
``MatMul`` with a constant weight, ``FusedBatchNorm*``, or a batch norm in its decomposed inference form ``x * a + c``
with constant per-channel a, c as ``tf.nn.batch_normalization`` and Keras write it) on a data path from the inputs to
the outputs gets a key:
(number of parameter ops before it on the longest data path, kind, weight shape, interface inputs it depends on,
interface outputs it feeds). The same keys are computed on our Keras model's layer graph; both lists are sorted by key
and paired one to one, every pair must agree on its key, and the op names only serve as a cross-check (mismatches are
reported, not fatal). Biases (``BiasAdd`` or ``Add`` of a constant after a convolution or dense op), batch-norm
epsilons other than 1e-5 and affine batch-norm parameters directly after a convolution are folded exactly into our
layers. Parity: ``parity_*`` run the frozen graph itself (``tf.compat.v1`` ``import_graph_def`` + ``Session``) and our
model on the same inputs and return the largest absolute difference.

A model file is a program, so a graph is never trusted: :class:`FrozenGraph` refuses, before anything else, a graph
with a node whose op is not in :data:`ALLOWED_OPS` (the pure tensor ops of the official layouts: no file or network
I/O, no Python calls, no state, no functions or control flow), or with a function library, naming the first such node
and its op in one line. Weights are read from ``Const`` nodes only; a "constant" computed from constants (e.g. the
``rsqrt(var + eps) * gamma`` of a decomposed batch norm, or ``tf.ones``) is evaluated in numpy by
:func:`_const_eval` for a handful of arithmetic ops, never by running the graph, so importing runs nothing. Only
the parity checks run a graph, and only one that passed the op check.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from ..geometry import normalized_keypoints
from ..io import CdSfmError

logger = logging.getLogger(__name__)

PARAM_OPS = {"Conv2D": "conv", "MatMul": "dense", "FusedBatchNorm": "bn", "FusedBatchNormV2": "bn",
             "FusedBatchNormV3": "bn"}
SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank"}
PASS_OPS = {"Identity", "Reshape", "Squeeze", "ExpandDims", "Snapshot"}

# The ops a ContextDesc graph (local, augmentation, regional ResNet50; TF1 graphs of 2019 and graphs frozen from
# TF2 / Keras) may hold: pure tensor arithmetic only. Anything else (ReadFile, WriteFile, PyFunc, EagerPyFunc,
# Save / Restore, Dataset ops, Print, variables, queues, control flow, function calls, unknown ops) is refused.
ALLOWED_OPS = frozenset({
    # inputs, constants, plumbing
    "Placeholder", "PlaceholderV2", "PlaceholderWithDefault", "Const", "Identity", "IdentityN", "Snapshot",
    "StopGradient", "PreventGradient", "NoOp",
    # layers
    "Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "BiasAdd",
    "BiasAddV1", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "Relu", "Relu6", "LeakyRelu", "Elu",
    "Selu", "Tanh", "Sigmoid", "Softmax", "LogSoftmax", "Softplus", "MaxPool", "AvgPool", "TopKV2",
    # element-wise and reductions
    "Add", "AddV2", "AddN", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "FloorDiv", "FloorMod", "Neg", "Abs", "Sign",
    "Square", "SquaredDifference", "Sqrt", "Rsqrt", "Reciprocal", "Exp", "Log", "Log1p", "Pow", "Maximum",
    "Minimum", "Floor", "Ceil", "Round", "ClipByValue", "Mean", "Sum", "Max", "Min", "Prod", "ArgMax", "ArgMin",
    "Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr", "LogicalNot",
    "Select", "SelectV2", "Cast",
    # shapes and indexing
    "Reshape", "Squeeze", "ExpandDims", "Transpose", "ConcatV2", "Concat", "Pack", "Unpack", "Split", "SplitV",
    "Slice", "StridedSlice", "Tile", "Pad", "PadV2", "MirrorPad", "Gather", "GatherV2", "GatherNd", "Fill",
    "ZerosLike", "OnesLike", "Range", "LinSpace", "Shape", "ShapeN", "Size", "Rank", "BroadcastTo", "BroadcastArgs",
    "OneHot", "ResizeBilinear", "ResizeNearestNeighbor",
})
MAX_CONST_ELEMENTS = 1 << 26  # 64 M values: the largest official weight (ResNet50 3x3x512x512) is 2.4 M


def check_graph_ops(graph_def, label: str) -> None:
    """Refuse a graph holding anything but :data:`ALLOWED_OPS` (one line naming the first offending node and op),
    a function library, or a constant declaring more than :data:`MAX_CONST_ELEMENTS` values."""
    if graph_def.library.function:
        f = graph_def.library.function[0]
        raise FrozenImportError(f"{label}: holds a function library (function {f.signature.name!r}); a ContextDesc "
                                f"graph has none, refusing it")
    for node in graph_def.node:
        if node.op not in ALLOWED_OPS:
            raise FrozenImportError(f"{label}: node {node.name!r} has op {node.op}, which a ContextDesc graph does "
                                    f"not use; refusing to import or run it")
        if node.op == "Const":
            dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
            count = int(np.prod(dims, dtype=np.float64)) if dims else 1
            if any(d < 0 for d in dims) or count > MAX_CONST_ELEMENTS:
                raise FrozenImportError(f"{label}: constant {node.name!r} declares shape {dims}; refusing it")


@dataclass(frozen=True)
class GraphSpec:
    kind: str
    inputs: dict  # canonical name -> graph tensor name
    outputs: dict  # canonical name -> graph tensor name
    keras_inputs: dict  # canonical name -> Keras input name
    kinds: frozenset  # parameter kinds this graph may hold


LOCAL_SPEC = GraphSpec(
    "local", {"patches": "input:0"}, {"conv6_feat": "conv6_feat:0", "kpt_mb": "kpt_mb:0"}, {"patches": "input"},
    frozenset({"conv", "dense", "bn"}))
AUGMENT_SPEC = GraphSpec(
    "augment",
    {"local_feat": "input/local_feat:0", "regional_feat": "input/regional_feat:0", "kpt_m": "input/kpt_m:0",
     "kpt_xy": "input/kpt_xy:0"},
    {"l2norm": "l2norm:0"},
    {"local_feat": "local_feat", "regional_feat": "regional_feat", "kpt_m": "kpt_m", "kpt_xy": "kpt_xy"},
    frozenset({"conv", "bn"}))
REGIONAL_SPEC = GraphSpec("regional", {"image": "input:0"}, {"res5c": "res5c:0"}, {"image": "input"},
                          frozenset({"conv", "bn"}))
SPECS = {"local": LOCAL_SPEC, "augment": AUGMENT_SPEC, "regional": REGIONAL_SPEC}


class FrozenImportError(CdSfmError):
    """A frozen graph that does not have the layout of the model it is imported into."""


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _port(tensor: str) -> int:
    parts = tensor.split(":")
    return int(parts[1]) if len(parts) > 1 else 0


def load_graph_def(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CdSfmError(f"{path}: frozen graph not found")
    gd = tf.compat.v1.GraphDef()
    try:
        gd.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise CdSfmError(f"{path}: not a TensorFlow GraphDef ({e})") from None
    if not gd.node:
        raise CdSfmError(f"{path}: empty graph")
    return gd


class FrozenGraph:
    """A frozen GraphDef with the lookups the importer needs, and a lazily created session to run it (parity checks
    only). The graph's ops are checked against :data:`ALLOWED_OPS` first: a graph that fails is refused here."""

    def __init__(self, source, label: str | None = None):
        is_def = hasattr(source, "node")
        self.label = str(label) if label else ("<graph>" if is_def else str(source))
        self.graph_def = source if is_def else load_graph_def(source)
        check_graph_ops(self.graph_def, self.label)
        self.nodes = {n.name: n for n in self.graph_def.node}
        self.consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)  # node -> [(consumer, port used)]
        for n in self.graph_def.node:
            for t in n.input:
                if not t.startswith("^"):
                    self.consumers[_node_name(t)].append((n.name, _port(t)))
        self._graph = None
        self._sess = None
        self._const_cache: dict[str, bool] = {}

    # ---- structure
    def data_inputs(self, name: str) -> list[str]:
        return [t for t in self.nodes[name].input if not t.startswith("^")]

    def has_tensor(self, tensor: str) -> bool:
        return _node_name(tensor) in self.nodes

    def placeholder_shape(self, tensor: str) -> list[int | None] | None:
        node = self.nodes[_node_name(tensor)]
        if "shape" not in node.attr or node.attr["shape"].shape.unknown_rank:
            return None
        return [d.size if d.size >= 0 else None for d in node.attr["shape"].shape.dim]

    def is_constant(self, name: str) -> bool:
        """True if the node depends on no placeholder at all (it can be evaluated without feeds)."""
        name = _node_name(name)
        if name in self._const_cache:
            return self._const_cache[name]
        stack, seen, result = [name], set(), True
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            node = self.nodes[cur]
            if node.op in ("Placeholder", "PlaceholderWithDefault", "PlaceholderV2") or self._const_cache.get(cur) is False:
                result = False
                break
            stack.extend(_node_name(t) for t in node.input)
        self._const_cache[name] = result
        return result

    def value(self, tensor: str) -> np.ndarray:
        """The value of a constant tensor: a ``Const`` node, or arithmetic on constants evaluated in numpy
        (:func:`_const_eval`); the graph itself is never run for it."""
        name = _node_name(tensor)
        if not self.is_constant(name):
            raise FrozenImportError(f"{self.label}: {tensor} is not a constant")
        if _port(tensor) != 0:
            raise FrozenImportError(f"{self.label}: {tensor} is not a constant this importer can read")
        return _const_eval(self, name, {})

    # ---- execution
    def _session(self):
        if self._sess is None:
            self._graph = tf.Graph()
            with self._graph.as_default():
                tf.compat.v1.import_graph_def(self.graph_def, name="")
            self._sess = tf.compat.v1.Session(graph=self._graph)
        return self._sess

    def run(self, feeds: dict, fetches: list[str]) -> list[np.ndarray]:
        sess = self._session()
        return sess.run(fetches, feed_dict={self._graph.get_tensor_by_name(k): v for k, v in feeds.items()})

    def close(self):
        if self._sess is not None:
            self._sess.close()
            self._sess = None


def _np_fill(dims, value, node):
    shape = tuple(int(d) for d in np.asarray(dims).reshape(-1))
    if any(d < 0 for d in shape) or np.prod(shape, dtype=np.float64) > MAX_CONST_ELEMENTS:
        raise FrozenImportError(f"{node.name}: a constant of shape {list(shape)}; refusing it")
    return np.full(shape, value)


def _np_cast(x, node):
    return x.astype(tf.dtypes.as_dtype(node.attr["DstT"].type).as_numpy_dtype)


# op -> numpy function of the input values (and the node, for attributes): the constant folding the importer needs
_CONST_OPS = {
    "Identity": lambda v, n: v[0], "Snapshot": lambda v, n: v[0], "StopGradient": lambda v, n: v[0],
    "Add": lambda v, n: v[0] + v[1], "AddV2": lambda v, n: v[0] + v[1], "Sub": lambda v, n: v[0] - v[1],
    "Mul": lambda v, n: v[0] * v[1], "RealDiv": lambda v, n: v[0] / v[1], "Neg": lambda v, n: -v[0],
    "Rsqrt": lambda v, n: 1.0 / np.sqrt(v[0]), "Sqrt": lambda v, n: np.sqrt(v[0]), "Square": lambda v, n: v[0] ** 2,
    "Reciprocal": lambda v, n: 1.0 / v[0], "Maximum": lambda v, n: np.maximum(v[0], v[1]),
    "Minimum": lambda v, n: np.minimum(v[0], v[1]), "Cast": lambda v, n: _np_cast(v[0], n),
    "Fill": lambda v, n: _np_fill(v[0], v[1], n),
    "Reshape": lambda v, n: v[0].reshape(tuple(int(d) for d in v[1])),
    "ExpandDims": lambda v, n: np.expand_dims(v[0], int(v[1])),
}


def _const_eval(fg: FrozenGraph, name: str, memo: dict) -> np.ndarray:
    """Value of a constant node by numpy constant folding over :data:`_CONST_OPS` (control inputs are ignored: nothing
    is run). Any other op is not read as a constant."""
    if name in memo:
        return memo[name]
    node = fg.nodes[name]
    if node.op == "Const":
        out = tf.make_ndarray(node.attr["value"].tensor)
    elif node.op in _CONST_OPS:
        args = []
        for t in fg.data_inputs(name):
            if _port(t) != 0:
                raise FrozenImportError(f"{fg.label}: {name} is not a constant this importer can read")
            args.append(np.asarray(_const_eval(fg, _node_name(t), memo)))
        try:
            out = np.asarray(_CONST_OPS[node.op](args, node))
        except FrozenImportError as e:
            raise FrozenImportError(f"{fg.label}: {e}") from None
        except (ValueError, TypeError, OverflowError) as e:
            raise FrozenImportError(f"{fg.label}: cannot fold constant {name!r} ({node.op}: {e})") from None
        if out.size > MAX_CONST_ELEMENTS:
            raise FrozenImportError(f"{fg.label}: constant {name!r} would hold {out.size} values; refusing it")
    else:
        raise FrozenImportError(f"{fg.label}: {name} ({node.op}) is not a constant this importer can read")
    memo[name] = out
    return out


# --------------------------------------------------------------------------------------------------------------------
# parameter ops and their keys


@dataclass
class ParamOp:
    name: str  # graph node or Keras layer name
    kind: str
    shape: tuple
    depth: int
    inputs: tuple
    outputs: tuple

    @property
    def key(self):
        return (self.depth, self.kind, self.shape, self.inputs, self.outputs)


def _graph_params(fg: FrozenGraph, spec: GraphSpec) -> list[ParamOp]:
    in_nodes = {}
    for canon, tensor in spec.inputs.items():
        if fg.has_tensor(tensor):
            in_nodes[_node_name(tensor)] = canon
    out_nodes = {}
    for canon, tensor in spec.outputs.items():
        if not fg.has_tensor(tensor):
            raise FrozenImportError(f"{fg.label}: no tensor {tensor} (expected a {spec.kind} graph with outputs "
                                    f"{', '.join(spec.outputs.values())})")
        out_nodes.setdefault(_node_name(tensor), set()).add(canon)
    if not in_nodes:
        raise FrozenImportError(f"{fg.label}: none of the inputs {', '.join(spec.inputs.values())} found")

    # ancestors of the outputs (data edges only), in topological order
    order, state = [], {}
    for root in out_nodes:
        stack = [(root, False)]
        while stack:
            cur, done = stack.pop()
            if done:
                state[cur] = 2
                order.append(cur)
                continue
            if state.get(cur):
                continue
            state[cur] = 1
            stack.append((cur, True))
            if fg.nodes[cur].op in SHAPE_OPS:
                continue
            for t in fg.data_inputs(cur):
                p = _node_name(t)
                if not state.get(p):
                    stack.append((p, False))
    reach_in: dict[str, frozenset] = {}
    depth_out: dict[str, int] = {}
    params: dict[str, ParamOp] = {}
    for name in order:
        node = fg.nodes[name]
        parents = [] if node.op in SHAPE_OPS else [_node_name(t) for t in fg.data_inputs(name)]
        r = frozenset({in_nodes[name]}) if name in in_nodes else frozenset()
        d = 0
        for p in parents:
            r |= reach_in.get(p, frozenset())
            d = max(d, depth_out.get(p, 0))
        reach_in[name] = r
        kind = PARAM_OPS.get(node.op)
        is_param = False
        if kind in spec.kinds and parents and reach_in.get(parents[0]):
            weights = parents[1:2] if kind != "bn" else parents[1:5]
            if weights and all(fg.is_constant(w) for w in weights):
                is_param = True
                shape = tuple(fg.value(parents[1] if kind != "bn" else parents[3]).shape)
                if kind == "dense" and node.attr["transpose_b"].b:
                    shape = shape[::-1]
                params[name] = ParamOp(name, kind, shape, d, tuple(sorted(r)), ())
        elif node.op == "Mul" and "bn" in spec.kinds and any(reach_in.get(p) for p in parents):
            aff = _affine_bn(fg, name)
            if aff is not None:
                is_param = True
                params[name] = ParamOp(name, "bn", (aff["a"].size,), d, tuple(sorted(r)), ())
        depth_out[name] = d + (1 if is_param else 0)
    # which outputs each node feeds
    reach_out: dict[str, set] = defaultdict(set)
    for name in reversed(order):
        reach_out[name] |= out_nodes.get(name, set())
        if fg.nodes[name].op in SHAPE_OPS:
            continue
        for t in fg.data_inputs(name):
            p = _node_name(t)
            if p in state:
                reach_out[p] |= reach_out[name]
    for name, op in params.items():
        op.outputs = tuple(sorted(reach_out[name]))
    return list(params.values())


def _affine_bn(fg: FrozenGraph, name: str):
    """A batch norm in its decomposed inference form (``tf.nn.batch_normalization``, Keras): ``x * a + c`` with
    constant per-channel vectors a, c (a Mul by a constant followed by Add / AddV2 / BiasAdd / Sub of a constant).
    Returns {"data", "a", "c", "add"} or None."""
    ins = [_node_name(t) for t in fg.data_inputs(name)]
    if len(ins) != 2:
        return None
    const = [i for i in ins if fg.is_constant(i)]
    if len(const) != 1:
        return None
    data = ins[1 - ins.index(const[0])]
    a = fg.value(const[0])
    if a.size < 2 or a.size != a.shape[-1]:
        return None
    cons = fg.consumers.get(name, [])
    if len(cons) != 1:
        return None
    add = fg.nodes[cons[0][0]]
    if add.op not in ("Add", "AddV2", "BiasAdd", "Sub"):
        return None
    add_ins = [_node_name(t) for t in fg.data_inputs(add.name)]
    if len(add_ins) != 2 or (add.op == "Sub" and add_ins[0] != name):
        return None
    other = add_ins[1] if add_ins[0] == name else add_ins[0]
    if other == name or not fg.is_constant(other):
        return None
    c = fg.value(other)
    if c.size != a.size:
        return None
    c = c.reshape(-1).astype(np.float64)
    return {"data": data, "a": a.reshape(-1).astype(np.float64), "c": -c if add.op == "Sub" else c, "add": add.name}


def _keras_params(model, spec: GraphSpec) -> list[ParamOp]:
    import keras

    inv_inputs = {v: k for k, v in spec.keras_inputs.items()}
    ops = [op for op in model.operations]
    parents = {}
    for op in ops:
        nodes = getattr(op, "_inbound_nodes", [])
        parents[op.name] = [p.operation.name for p in nodes[0].parent_nodes] if nodes else []
    outs = getattr(model, "_outputs_struct", None)
    if not isinstance(outs, dict):
        outs = dict(zip(model.output_names, model.outputs))
    out_ops = defaultdict(set)
    for canon, t in outs.items():
        out_ops[t._keras_history.operation.name].add(canon)
    by_name = {op.name: op for op in ops}
    # topological order
    order, seen = [], set()
    for root in by_name:
        stack = [(root, False)]
        while stack:
            cur, done = stack.pop()
            if done:
                order.append(cur)
                continue
            if cur in seen:
                continue
            seen.add(cur)
            stack.append((cur, True))
            stack.extend((p, False) for p in parents[cur] if p not in seen)
    reach_in, depth_out, params = {}, {}, {}
    for name in order:
        op = by_name[name]
        r = frozenset({inv_inputs[name]}) if name in inv_inputs else frozenset()
        d = 0
        for p in parents[name]:
            r |= reach_in[p]
            d = max(d, depth_out[p])
        reach_in[name] = r
        kind = shape = None
        if isinstance(op, keras.layers.Conv2D):
            kind, shape = "conv", tuple(op.kernel.shape)
        elif isinstance(op, keras.layers.Dense):
            kind, shape = "dense", tuple(op.kernel.shape)
        elif isinstance(op, keras.layers.BatchNormalization):
            kind, shape = "bn", tuple(op.moving_mean.shape)
        if kind:
            params[name] = ParamOp(name, kind, shape, d, tuple(sorted(r)), ())
        depth_out[name] = d + (1 if kind else 0)
    reach_out = defaultdict(set)
    for name in reversed(order):
        reach_out[name] |= out_ops.get(name, set())
        for p in parents[name]:
            reach_out[p] |= reach_out[name]
    for name, op in params.items():
        op.outputs = tuple(sorted(reach_out[name]))
    return list(params.values())


def _sort_key(op: ParamOp):
    return (op.depth, op.kind, op.shape, op.inputs, op.outputs, op.name)


def _names_agree(graph_name: str, layer_name: str) -> bool:
    """Loose cross-check of a graph op name (``scope/op``) against a Keras layer name (scopes joined by ``_``)."""
    parts = [p for p in graph_name.split("/")[:-1] if p not in ("Tensordot", "BiasAdd")] or graph_name.split("/")
    a, b = "_".join(parts).lower(), layer_name.lower()
    return a == b or a.endswith(b) or b.endswith(a)


def match_params(fg: FrozenGraph, model, spec: GraphSpec) -> list[tuple[ParamOp, ParamOp]]:
    g = sorted(_graph_params(fg, spec), key=_sort_key)
    k = sorted(_keras_params(model, spec), key=_sort_key)
    if len(g) != len(k):
        gc, kc = defaultdict(int), defaultdict(int)
        for op in g:
            gc[op.kind] += 1
        for op in k:
            kc[op.kind] += 1
        raise FrozenImportError(
            f"{fg.label}: the graph has {len(g)} parameter ops ({dict(gc)}), the {spec.kind} model expects {len(k)} "
            f"({dict(kc)}); not a {spec.kind} graph of this layout")
    for go, ko in zip(g, k):
        if go.key != ko.key:
            raise FrozenImportError(
                f"{fg.label}: graph op {go.name} ({go.kind} {go.shape}, depth {go.depth}, inputs {go.inputs}, "
                f"outputs {go.outputs}) does not fit layer {ko.name} ({ko.kind} {ko.shape}, depth {ko.depth}, "
                f"inputs {ko.inputs}, outputs {ko.outputs})")
    return list(zip(g, k))


# --------------------------------------------------------------------------------------------------------------------
# transfer


@dataclass
class ImportReport:
    kind: str
    source: str
    pairs: int = 0
    name_mismatches: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    interp: str | None = None
    visual: bool | None = None

    def summary(self) -> str:
        s = f"{self.kind}: {self.pairs} parameter ops from {self.source}"
        if self.folded:
            s += f", folded {len(self.folded)}"
        if self.name_mismatches:
            s += f", {len(self.name_mismatches)} name(s) differ"
        if self.interp:
            s += f", interpolation {self.interp}"
        return s


def _attached_bias(fg: FrozenGraph, name: str):
    """The constant bias added right after a convolution / dense op (through reshapes), or None."""
    cur = name
    for _ in range(4):
        cons = fg.consumers.get(cur, [])
        if len(cons) != 1:
            return None, None
        nxt = fg.nodes[cons[0][0]]
        if nxt.op in ("BiasAdd", "Add", "AddV2"):
            ins = [_node_name(t) for t in fg.data_inputs(nxt.name)]
            other = [i for i in ins if i != cur]
            if len(other) == 1 and fg.is_constant(other[0]):
                b = fg.value(other[0])
                if b.ndim == 1 or b.size == b.shape[-1]:
                    return b.reshape(-1), nxt.name
            return None, None
        if nxt.op not in PASS_OPS:
            return None, None
        cur = nxt.name
    return None, None


def _producer_param(fg: FrozenGraph, name: str, params: set) -> str | None:
    """The parameter op feeding ``name`` directly (through reshapes and bias adds), if any."""
    ins = [_node_name(t) for t in fg.data_inputs(name)]
    data = [i for i in ins if not fg.is_constant(i)] if fg.nodes[name].op == "Mul" else ins[:1]
    if len(data) != 1:
        return None
    cur = data[0]
    for _ in range(6):
        if cur in params:
            return cur
        node = fg.nodes[cur]
        if node.op in PASS_OPS or node.op in ("BiasAdd", "Add", "AddV2"):
            ins = [_node_name(t) for t in fg.data_inputs(cur)]
            data = [i for i in ins if not fg.is_constant(i)]
            if len(data) != 1:
                return None
            cur = data[0]
        else:
            return None
    return None


def _check_conv_attrs(fg: FrozenGraph, gname: str, layer) -> None:
    node = fg.nodes[gname]
    pad = node.attr["padding"].s.decode().lower()
    strides = list(node.attr["strides"].list.i)
    fmt = node.attr["data_format"].s.decode() or "NHWC"
    if fmt != "NHWC":
        raise FrozenImportError(f"{fg.label}: {gname} uses data format {fmt}; only NHWC graphs are supported")
    want_pad = layer.padding.lower()
    kernel = tuple(layer.kernel_size)
    if pad != want_pad and not (kernel == (1, 1) and tuple(layer.strides) == (1, 1)):
        raise FrozenImportError(f"{fg.label}: {gname} uses padding {pad.upper()}, layer {layer.name} expects "
                                f"{want_pad.upper()}")
    if tuple(strides[1:3]) != tuple(layer.strides):
        raise FrozenImportError(f"{fg.label}: {gname} has strides {strides[1:3]}, layer {layer.name} expects "
                                f"{list(layer.strides)}")


def transfer(fg: FrozenGraph, model, spec: GraphSpec, report: ImportReport | None = None) -> ImportReport:
    """Copy the graph's constants into ``model`` (layout checked by ``match_params``)."""
    report = report or ImportReport(spec.kind, fg.label)
    pairs = match_params(fg, model, spec)
    report.pairs = len(pairs)
    g2layer = {go.name: model.get_layer(ko.name) for go, ko in pairs}
    pending_bias: dict[str, np.ndarray] = {}  # graph conv -> bias to fold into its batch norm
    for go, ko in pairs:
        if not _names_agree(go.name, ko.name):
            report.name_mismatches.append((go.name, ko.name))
        layer = g2layer[go.name]
        if go.kind == "bn":
            continue
        node = fg.nodes[go.name]
        kernel = fg.value(node.input[1]).astype(np.float32)
        if go.kind == "dense" and node.attr["transpose_b"].b:
            kernel = kernel.T
        if go.kind == "conv":
            _check_conv_attrs(fg, go.name, layer)
        bias, _ = _attached_bias(fg, go.name)
        weights = [kernel]
        if layer.use_bias:
            weights.append(np.zeros(kernel.shape[-1], np.float32) if bias is None else bias.astype(np.float32))
        elif bias is not None and np.any(bias != 0):
            pending_bias[go.name] = bias.astype(np.float32)
        layer.set_weights(weights)
    param_names = set(g2layer)
    for go, ko in pairs:
        if go.kind != "bn":
            continue
        layer = g2layer[go.name]
        node = fg.nodes[go.name]
        if node.op == "Mul":  # decomposed form x * a + c == (x - (-c / a)) / sqrt(1 / a^2) with unit epsilon-free std
            aff = _affine_bn(fg, go.name)
            a, c = aff["a"], aff["c"]
            if np.all(a > 0):
                gamma, beta, eps = np.ones_like(a), np.zeros_like(a), 0.0
                mean, var = -c / a, 1.0 / (a * a)
            else:  # a sign flip cannot live in the normalisation: gamma = a, beta = c, unit statistics
                gamma, beta, eps = a, c, 0.0
                mean, var = np.zeros_like(a), np.ones_like(a)
        else:
            ins = fg.data_inputs(go.name)
            gamma, beta, mean, var = (fg.value(t).astype(np.float64) for t in ins[1:5])
            eps = float(node.attr["epsilon"].f) if "epsilon" in node.attr else 1e-3
            if node.attr["is_training"].b:
                raise FrozenImportError(f"{fg.label}: {go.name} is a batch norm in training mode")
        producer = _producer_param(fg, go.name, param_names)
        if producer in pending_bias:
            mean = mean - pending_bias.pop(producer)
            report.folded.append(f"bias {producer} -> {go.name}")
        std = np.sqrt(var + eps)
        var_k = var + eps - layer.epsilon  # keeps sqrt(var + eps) with the layer's epsilon
        if abs(eps - layer.epsilon) > 1e-12:
            report.folded.append(f"epsilon {eps:g} -> {layer.epsilon:g} in {go.name}")
        trivial_scale = np.allclose(gamma, 1.0, rtol=0, atol=1e-7)
        trivial_offset = np.allclose(beta, 0.0, rtol=0, atol=1e-7)
        weights = {}
        if layer.scale:
            weights["gamma"] = gamma
        if layer.center:
            weights["beta"] = beta
        if (not layer.scale and not trivial_scale) or (not layer.center and not trivial_offset):
            if layer.scale or layer.center:
                raise FrozenImportError(f"{fg.label}: {go.name} has scale/offset that layer {layer.name} cannot hold")
            # y = g (c - m) / s + b  ==  (g c - (g m - b s)) / s : scale the producing conv, shift the mean
            if producer is None or fg.nodes[producer].op != "Conv2D" or len(fg.consumers.get(producer, [])) != 1:
                raise FrozenImportError(f"{fg.label}: {go.name} has scale/offset but no convolution of its own right "
                                        f"before it to fold them into")
            conv = g2layer[producer]
            cw = conv.get_weights()
            cw[0] = (cw[0] * gamma).astype(np.float32)
            if conv.use_bias:
                cw[1] = (cw[1] * gamma).astype(np.float32)
            conv.set_weights(cw)
            mean = gamma * mean - beta * std
            report.folded.append(f"scale/offset {go.name} -> {producer}")
        weights["moving_mean"] = mean
        weights["moving_variance"] = var_k
        ordered = []
        for var_obj in layer.weights:
            key = var_obj.path.rsplit("/", 1)[-1]
            ordered.append(np.asarray(weights[key], np.float32).reshape(var_obj.shape))
        layer.set_weights(ordered)
    if pending_bias:
        raise FrozenImportError(f"{fg.label}: bias of {sorted(pending_bias)[0]} cannot be placed (no bias in the "
                                f"layer and no batch norm right after it)")
    if report.name_mismatches:
        logger.debug("%s: op names that differ from layer names: %s", fg.label, report.name_mismatches[:10])
    return report


# --------------------------------------------------------------------------------------------------------------------
# the three graphs


def detect_interp_mode(fg: FrozenGraph) -> str | None:
    """How the augmentation graph weights its 3 nearest grid neighbours: ``inverse_distance`` when the top-k values
    (negated distances) are negated back before the clamp, ``uniform`` when the clamp ``max(-d, 1e-10)`` is applied
    to the negated values directly (then every weight is 1/3). None if the graph has no top-k."""
    topk = [n for n in fg.graph_def.node if n.op in ("TopKV2", "TopK")]
    if not topk:
        return None
    modes = set()
    for t in topk:
        frontier = [c for c, port in fg.consumers.get(t.name, []) if port == 0]
        while frontier:
            c = frontier.pop()
            op = fg.nodes[c].op
            if op in ("Identity", "Snapshot"):
                frontier.extend(cc for cc, _ in fg.consumers.get(c, []))
            elif op == "Neg":
                modes.add("inverse_distance")
            elif op == "Maximum":
                modes.add("uniform")
    if len(modes) == 1:
        return modes.pop()
    logger.warning("%s: could not tell how the graph weights grid neighbours; using inverse distance", fg.label)
    return "inverse_distance"


def _has_data_input(fg: FrozenGraph, spec: GraphSpec, canon: str) -> bool:
    return fg.has_tensor(spec.inputs[canon])


def import_local(pb, model=None):
    """Read a local frozen graph into a (new or given) Keras local model. Returns (model, report)."""
    from ..models.local import build_local_model

    fg = pb if isinstance(pb, FrozenGraph) else FrozenGraph(pb, label=str(pb))
    model = model or build_local_model()
    report = transfer(fg, model, LOCAL_SPEC)
    return model, report


def import_augment(pb, model=None):
    """Read an augmentation frozen graph. A graph without ``input/regional_feat`` gives the geometric-only model."""
    from ..models.augment import build_augment_model

    fg = pb if isinstance(pb, FrozenGraph) else FrozenGraph(pb, label=str(pb))
    visual = _has_data_input(fg, AUGMENT_SPEC, "regional_feat")
    interp = detect_interp_mode(fg) if visual else None
    if model is None:
        model = build_augment_model(visual=visual, interp=interp or "inverse_distance")
    report = ImportReport("augment", fg.label, interp=interp, visual=visual)
    spec = AUGMENT_SPEC
    if not visual:
        spec = GraphSpec(spec.kind, {k: v for k, v in spec.inputs.items() if k != "regional_feat"}, spec.outputs,
                         {k: v for k, v in spec.keras_inputs.items() if k != "regional_feat"}, spec.kinds)
    transfer(fg, model, spec, report)
    return model, report


def import_regional(pb, model=None):
    from ..models.regional import RGB_MEAN, build_regional_model

    fg = pb if isinstance(pb, FrozenGraph) else FrozenGraph(pb, label=str(pb))
    model = model or build_regional_model()
    report = transfer(fg, model, REGIONAL_SPEC)
    mean = _find_input_mean(fg)
    if mean is not None and not np.allclose(mean, RGB_MEAN, atol=0.5):
        logger.warning("%s: the graph subtracts the mean %s, our model %s", fg.label, np.round(mean, 2), RGB_MEAN)
        report.folded.append(f"mean differs: {np.round(mean, 2).tolist()}")
    return model, report


def _find_input_mean(fg: FrozenGraph):
    name = _node_name(REGIONAL_SPEC.inputs["image"])
    frontier = [name]
    for _ in range(4):
        nxt = []
        for cur in frontier:
            for c, _port in fg.consumers.get(cur, []):
                node = fg.nodes[c]
                if node.op in ("Sub", "Add", "AddV2", "BiasAdd"):
                    other = [_node_name(t) for t in fg.data_inputs(c) if _node_name(t) != cur]
                    if other and fg.is_constant(other[0]):
                        v = fg.value(other[0]).reshape(-1)
                        if v.size == 3:
                            return v if node.op == "Sub" else -v
                nxt.append(c)
        frontier = nxt
    return None


# --------------------------------------------------------------------------------------------------------------------
# parity


def _as_graph(pb) -> FrozenGraph:
    return pb if isinstance(pb, FrozenGraph) else FrozenGraph(pb, label=str(pb))


def parity_local(pb, model, patches: np.ndarray) -> float:
    fg = _as_graph(pb)
    x = np.asarray(patches, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    ph = fg.placeholder_shape(LOCAL_SPEC.inputs["patches"])
    if ph and ph[0] is not None:
        x = np.resize(x, (ph[0],) + x.shape[1:])
    ref_f, ref_m = fg.run({"input:0": x}, ["conv6_feat:0", "kpt_mb:0"])
    out = model(x, training=False)
    d1 = np.abs(np.asarray(out["conv6_feat"]) - ref_f.reshape(len(x), -1)).max()
    d2 = np.abs(np.asarray(out["kpt_mb"]).reshape(-1) - ref_m.reshape(-1)).max()
    return float(max(d1, d2))


def parity_augment(pb, model, inputs: dict) -> float:
    """``inputs``: local_feat (1,N,128), kpt_m (1,N,1), kpt_xy (1,N,2), regional_feat (1,h,w,2048)."""
    fg = _as_graph(pb)
    feeds = {AUGMENT_SPEC.inputs[k]: np.asarray(v, np.float32) for k, v in inputs.items()
             if fg.has_tensor(AUGMENT_SPEC.inputs[k])}
    (ref,) = fg.run(feeds, ["l2norm:0"])
    names = {i.name for i in model.inputs}
    ours_in = {k: np.asarray(v, np.float32) for k, v in inputs.items() if k in names}
    ours_in["kpt_mask"] = np.ones(np.asarray(inputs["local_feat"]).shape[:2], np.float32)
    out = np.asarray(model(ours_in, training=False)["l2norm"])
    return float(np.abs(out - ref.reshape(out.shape)).max())


def parity_regional(pb, model, image: np.ndarray) -> tuple[float, float]:
    """Returns (max abs diff, max abs diff / max |reference|)."""
    fg = _as_graph(pb)
    x = np.asarray(image, np.float32)
    if x.ndim == 3:
        x = x[None]
    (ref,) = fg.run({"input:0": x}, ["res5c:0"])
    out = np.asarray(model(x, training=False)["res5c"])
    d = float(np.abs(out - ref.reshape(out.shape)).max())
    return d, d / max(float(np.abs(ref).max()), 1e-12)


# --------------------------------------------------------------------------------------------------------------------
# generated inputs for checks


def generated_image(height: int = 256, width: int = 320, seed: int = 0) -> np.ndarray:
    """A textured RGB uint8 test image (smoothed noise and rectangles), the same for the same seed."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        x1, y1 = x0 + rng.integers(8, width // 3), y0 + rng.integers(8, height // 3)
        cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), rng.uniform(0, 255, 3).tolist(), -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.0) + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generated_patches(n: int = 256, seed: int = 0):
    """(patches (n,32,32) standardised, keypoints (n,2), image size (w, h)) from a generated image's SIFT
    keypoints; topped up with random patches when the image has fewer keypoints."""
    from ..features.patches import SiftDetectorConf, detect_sift, extract_patches, to_gray

    img = generated_image(seed=seed)
    gray = to_gray(img)
    kp = detect_sift(gray, SiftDetectorConf(max_keypoints=n))
    patches = extract_patches(gray, kp["keypoints"], kp["scales"], kp["angles"])
    xy = kp["keypoints"]
    rng = np.random.default_rng(seed + 1)
    if len(patches) < n:
        extra = n - len(patches)
        patches = np.concatenate([patches, rng.normal(size=(extra, 32, 32)).astype(np.float32)])
        xy = np.concatenate([xy, rng.uniform(0, 1, (extra, 2)).astype(np.float32) * [img.shape[1], img.shape[0]]])
    return patches.astype(np.float32), xy.astype(np.float32), (img.shape[1], img.shape[0])


def check_parity(local_pb=None, aug_pb=None, regional_pb=None, local_model=None, aug_model=None,
                 regional_model=None, n: int = 256, seed: int = 0, regional_size=(192, 256)) -> dict:
    """Run each given frozen graph and its Keras model on generated inputs; returns {component: max abs diff}
    (regional: also ``regional_rel``, relative to the largest reference value)."""
    result = {}
    patches, xy, (w, h) = generated_patches(n, seed)
    feat = mb = None
    if local_pb is not None:
        lg = _as_graph(local_pb)
        if local_model is None:
            local_model, _ = import_local(lg)
        result["local"] = parity_local(lg, local_model, patches)
        feat, mb = lg.run({"input:0": patches[..., None]}, ["conv6_feat:0", "kpt_mb:0"])
    if aug_pb is not None:
        ag = _as_graph(aug_pb)
        if aug_model is None:
            aug_model, _ = import_augment(ag)
        rng = np.random.default_rng(seed + 2)
        if feat is None:
            feat = rng.normal(0, 0.3, (n, 128)).astype(np.float32)
            mb = rng.uniform(-1, 1, n).astype(np.float32)
        kxy = normalized_keypoints(xy, w, h)
        inputs = {"local_feat": feat.reshape(1, n, -1), "kpt_m": mb.reshape(1, n, 1),
                  "kpt_xy": kxy.reshape(1, n, 2).astype(np.float32)}
        if ag.has_tensor(AUGMENT_SPEC.inputs["regional_feat"]):
            inputs["regional_feat"] = rng.normal(0, 1, (1, 6, 8, 2048)).astype(np.float32)
        result["augment"] = parity_augment(ag, aug_model, inputs)
    if regional_pb is not None:
        rg = _as_graph(regional_pb)
        if regional_model is None:
            regional_model, _ = import_regional(rg)
        img = generated_image(*regional_size, seed=seed).astype(np.float32)
        result["regional"], result["regional_rel"] = parity_regional(rg, regional_model, img)
    return result
