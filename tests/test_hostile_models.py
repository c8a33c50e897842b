"""A model file is a program: frozen graphs with the official tensor names plus file I/O, Python calls, functions or
unknown ops must be refused by ``models import`` and ``models check`` before anything runs (one line naming the node
and its op, exit status 2, no file written); pickled weight files are refused with one line naming the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from cd_graphs import build_augment_graph, build_local_graph
from cd_sfm.io import CdSfmError, read_npz
from cd_sfm.modeltools import frozen

REPO = Path(__file__).resolve().parents[1]


def run_cli(home: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CD_SFM_HOME": str(home)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "cd_sfm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def _const(gd, name, value, dtype=None):
    node = gd.node.add()
    node.name, node.op = name, "Const"
    t = tf.make_tensor_proto(value, dtype=dtype)
    node.attr["value"].tensor.CopyFrom(t)
    node.attr["dtype"].type = t.dtype
    return node


def _add_write_file(gd, target: Path, secret: Path, hook: str) -> None:
    """ReadFile(secret) -> WriteFile(target), run as a control dependency of node ``hook`` (the way a hostile graph
    makes a session that fetches the official outputs write a file)."""
    _const(gd, "evil/secret_name", str(secret).encode())
    _const(gd, "evil/target_name", str(target).encode())
    read = gd.node.add()
    read.name, read.op = "evil/read", "ReadFile"
    read.input.append("evil/secret_name")
    write = gd.node.add()
    write.name, write.op = "evil/write", "WriteFile"
    write.input.extend(["evil/target_name", "evil/read"])
    for n in gd.node:
        if n.name == hook:
            n.input.append("^evil/write")
            return
    raise AssertionError(hook)


def _hostile(src: Path, out: Path, target: Path, secret: Path, hook: str = "conv6_feat") -> Path:
    gd = frozen.load_graph_def(src)
    _add_write_file(gd, target, secret, hook)
    out.write_bytes(gd.SerializeToString())
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean_graphs")
    return {"local": build_local_graph(d / "loc.pb", seed=21), "aug": build_augment_graph(d / "aug.pb", seed=22)}


@pytest.fixture()
def secret(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("private")
    return p


def _one_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_the_hostile_graph_really_writes_when_run(clean, tmp_path, secret):
    """Control: TensorFlow itself runs the WriteFile when the official output is fetched (what the old import did)."""
    target = tmp_path / "written.txt"
    pb = _hostile(clean["local"], tmp_path / "evil.pb", target, secret)
    gd = frozen.load_graph_def(pb)
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        sess.run("conv6_feat:0", {"input:0": np.zeros((1, 32, 32, 1), np.float32)})
    assert target.read_text() == "private"


@pytest.mark.parametrize("check_flag", [[], ["--check"]])
def test_import_refuses_write_file_graph(clean, tmp_path, secret, check_flag):
    target = tmp_path / "written.txt"
    pb = _hostile(clean["local"], tmp_path / "contextdesc-e2e.pb", target, secret)
    home = tmp_path / "home"
    p = run_cli(home, "models", "import", "--local", pb, "--name", "evil", *check_flag)
    assert p.returncode == 2
    line = _one_line(p)
    assert str(pb) in line and "'evil/" in line and ("ReadFile" in line or "WriteFile" in line)
    assert not target.exists()
    assert not (home / "models" / "evil").exists()


def test_import_refuses_a_hostile_augmentation_graph_too(clean, tmp_path, secret):
    target = tmp_path / "written.txt"
    aug = _hostile(clean["aug"], tmp_path / "aug.pb", target, secret, hook="l2norm")
    p = run_cli(tmp_path / "home", "models", "import", "--local", clean["local"], "--aug", aug, "--name", "x",
                "--check")
    line = _one_line(p)
    assert p.returncode == 2 and str(aug) in line and ("WriteFile" in line or "ReadFile" in line)
    assert not target.exists() and not (tmp_path / "home" / "models" / "x").exists()


def test_check_refuses_a_swapped_graph_before_running_anything(clean, tmp_path, secret):
    """A clean import whose kept original/local.pb is later replaced: `models check` refuses it, and checks every
    graph before running any (the clean augmentation graph is not run either)."""
    home = tmp_path / "home"
    p = run_cli(home, "models", "import", "--local", clean["local"], "--aug", clean["aug"], "--name", "m")
    assert p.returncode == 0, p.stderr
    assert "parity not checked" in p.stdout and "models check m" in p.stdout
    # only our own log lines: TensorFlow's start-up lines (cpu_feature_guard, absl, oneDNN) are silenced without -v
    assert all(ln.startswith("[") for ln in p.stderr.strip().splitlines()), p.stderr
    target = tmp_path / "written.txt"
    orig = home / "models" / "m" / "original"
    _hostile(clean["aug"], orig / "aug.pb", target, secret, hook="l2norm")
    p = run_cli(home, "models", "check", "m")
    assert p.returncode == 2 and "aug.pb" in _one_line(p) and "evil/" in _one_line(p)
    assert not target.exists()
    # restored, the check runs and passes
    shutil.copy(clean["aug"], orig / "aug.pb")
    p = run_cli(home, "models", "check", "m", "--num-patches", "32")
    assert p.returncode == 0 and "parity OK" in p.stdout


def _node(gd, name, op, inputs=(), **attrs):
    n = gd.node.add()
    n.name, n.op = name, op
    n.input.extend(inputs)
    return n


@pytest.mark.parametrize("op", ["PyFunc", "EagerPyFunc", "SaveV2", "RestoreV2", "Print", "PrintV2",
                                "TensorDataset", "VarHandleOp", "NoSuchOpAnywhere"])
def test_ops_outside_the_allow_list_are_refused(clean, tmp_path, op):
    gd = frozen.load_graph_def(clean["local"])
    _node(gd, "sneaky", op)
    for n in gd.node:
        if n.name == "kpt_mb":
            n.input.append("^sneaky")
    with pytest.raises(frozen.FrozenImportError, match=f"node 'sneaky' has op {op},") as e:
        frozen.import_local(frozen.FrozenGraph(gd, label="x.pb"))
    assert "\n" not in str(e.value) and str(e.value).startswith("x.pb: ")


def test_a_real_py_func_graph_is_refused(tmp_path):
    """A graph built with tf.compat.v1.py_func (a PyFunc node calling Python) and the official names."""
    target = tmp_path / "pyfunc.txt"
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 32, 32, 1), name="input")

        def evil(v):
            target.write_text("ran")
            return v

        y = tf.compat.v1.py_func(evil, [tf.reshape(x, (-1, 1024))[:, :128]], tf.float32)
        tf.identity(tf.reshape(y, (-1, 128)), name="conv6_feat")
        tf.identity(tf.reduce_mean(x, axis=[1, 2, 3]), name="kpt_mb")
    pb = tmp_path / "loc.pb"
    pb.write_bytes(g.as_graph_def().SerializeToString())
    p = run_cli(tmp_path / "home", "models", "import", "--local", pb, "--name", "py", "--check")
    assert p.returncode == 2 and "has op PyFunc" in _one_line(p)
    assert not target.exists()


def test_function_library_is_refused(tmp_path):
    g = tf.Graph()
    with g.as_default():
        @tf.function
        def f(v):
            return v * 2.0

        x = tf.compat.v1.placeholder(tf.float32, (None, 32, 32, 1), name="input")
        tf.identity(tf.reshape(f(x), (-1, 1024))[:, :128], name="conv6_feat")
        tf.identity(tf.reduce_mean(x, axis=[1, 2, 3]), name="kpt_mb")
    gd = g.as_graph_def()
    assert gd.library.function
    with pytest.raises(frozen.FrozenImportError, match="function library"):
        frozen.FrozenGraph(gd, label="f.pb")


def test_huge_declared_constant_is_refused_without_allocating(clean):
    gd = frozen.load_graph_def(clean["local"])
    node = _const(gd, "huge", np.float32(1.0))
    node.attr["value"].tensor.tensor_shape.Clear()
    node.attr["value"].tensor.tensor_shape.dim.add().size = 1 << 40
    with pytest.raises(frozen.FrozenImportError, match="constant 'huge' declares shape"):
        frozen.FrozenGraph(gd, label="big.pb")


def test_constants_are_folded_in_numpy_not_run(clean):
    """Weights computed from constants (rsqrt(var + eps) * gamma of a decomposed batch norm, tf.ones) are read by
    numpy folding; an op outside the folding set is not a constant the importer reads."""
    fg = frozen.FrozenGraph(frozen.load_graph_def(clean["local"]), label="g")
    fg._session = None  # any attempt to run the graph fails loudly
    consts = [n.name for n in fg.graph_def.node if n.op != "Const" and fg.is_constant(n.name)]
    assert consts  # the test graph has folded-constant nodes (tf.ones / zeros and the like)
    model, report = frozen.import_local(fg)
    assert report.pairs == 21


def test_pickled_npz_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "local.npz"
    np.savez(bad, **{"conv0/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CdSfmError, match="pickled Python objects") as e:
        read_npz(bad)
    assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CdSfmError, match="junk.npz: not a"):
        read_npz(tmp_path / "junk.npz")


def test_pickled_weights_in_a_model_folder_give_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    np.savez(folder / "local.npz", **{"conv0/kernel": np.array([object()], dtype=object)})
    img = tmp_path / "img"
    img.mkdir()
    from cd_sfm.modeltools.frozen import generated_image
    import cv2

    for i in range(2):
        cv2.imwrite(str(img / f"{i}.png"), generated_image(seed=i))
    p = run_cli(tmp_path / "home", "extract", img, tmp_path / "out", "--model", folder, "-qq")
    assert p.returncode == 2, p.stderr
    line = _one_line(p)
    assert str(folder / "local.npz") in line and "pickled" in line
