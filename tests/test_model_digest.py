"""Features made with other weights under the same model name are recognised as stale."""

import shutil

import pytest

from cd_sfm import pipeline
from cd_sfm.io import CdSfmError
from cd_sfm.models import registry


def test_digest_changes_with_weights_and_marks_features_stale(tmp_path):
    shipped = registry.resolve(None)
    folder = tmp_path / "m"
    shutil.copytree(shipped.folder, folder)
    conf = pipeline.prepare_conf({"features": "contextdesc", "model": str(folder)}, check_pairs=False)
    d0 = conf["model_digest"]
    assert d0 and d0 == registry.resolve(str(folder)).digest(("local", "augment", "regional"))
    raw = pipeline.prepare_conf({"features": "contextdesc", "model": str(folder), "augment": False}, check_pairs=False)
    assert raw["model_digest"] == registry.resolve(str(folder)).digest(("local",))

    out = tmp_path / "out"
    out.mkdir()
    (out / "features.h5").write_bytes(b"")
    from cd_sfm import config as config_mod

    config_mod.save_config(conf, out / "config.yaml")
    pipeline.check_not_stale(out, conf, overwrite=False)  # same weights: fine
    with open(folder / "local.npz", "ab") as f:  # other weights under the same folder / name
        f.write(b"\0")
    conf2 = pipeline.prepare_conf({"features": "contextdesc", "model": str(folder)}, check_pairs=False)
    assert conf2["model_digest"] != d0
    with pytest.raises(CdSfmError, match="model_digest"):
        pipeline.check_not_stale(out, conf2, overwrite=False)
