"""bench/ssm_kernels.py's peer build, up to the compile: the causal-conv1d sdist's layout (gpu11: the build looked
for csrc/ inside csrc/ and handed torch's loader no sources, so the conv peer never ran)."""

from __future__ import annotations

import io
import tarfile

import pytest

from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def ssm_kernels():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))
        yield load_module("ssm_kernels", "bench/ssm_kernels.py")


def _sdist(path, names):
    with tarfile.open(path, "w:gz") as archive:
        for name in names:
            data = b"// stand-in\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_the_conv_peer_builds_every_source_of_its_sdist(ssm_kernels, tmp_path):
    files = ["causal_conv1d.cpp", "causal_conv1d.h", "causal_conv1d_bwd.cu", "causal_conv1d_fwd.cu",
             "causal_conv1d_update.cu"]
    sdist = _sdist(tmp_path / "causal_conv1d-1.7.0.tar.gz",
                   [f"causal_conv1d-1.7.0/csrc/{name}" for name in files]
                   + ["causal_conv1d-1.7.0/causal_conv1d/causal_conv1d_interface.py"])
    root, sources = ssm_kernels.unpack_causal_conv1d(sdist)
    assert (root / "causal_conv1d" / "causal_conv1d_interface.py").is_file()
    assert [path.name for path in sources] == ["causal_conv1d.cpp", "causal_conv1d_bwd.cu", "causal_conv1d_fwd.cu",
                                               "causal_conv1d_update.cu"]


def test_an_sdist_without_the_sources_says_so(ssm_kernels, tmp_path):
    sdist = _sdist(tmp_path / "causal_conv1d-9.0.tar.gz", ["causal_conv1d-9.0/setup.py"])
    with pytest.raises(FileNotFoundError, match="not a causal-conv1d 1.x sdist"):
        ssm_kernels.unpack_causal_conv1d(sdist)


def test_an_unpacked_peer_is_reused_as_it_is(ssm_kernels, tmp_path):
    """--build-conv-peer builds from a fixed folder in the background; the section unpacks into it again and must not
    overwrite the sources (newer files would make ninja rebuild what the background job built)."""
    sdist = _sdist(tmp_path / "causal_conv1d-1.7.0.tar.gz", ["causal_conv1d-1.7.0/csrc/causal_conv1d.cpp"])
    target = tmp_path / "unpacked"
    root, _ = ssm_kernels.unpack_causal_conv1d(sdist, target)
    source = root / "csrc" / "causal_conv1d.cpp"
    source.write_text("// built from\n")
    assert ssm_kernels.unpack_causal_conv1d(sdist, target)[0] == root
    assert source.read_text() == "// built from\n"


def test_build_conv_peer_writes_why_it_failed(ssm_kernels, tmp_path, monkeypatch):
    monkeypatch.setattr(ssm_kernels, "causal_conv1d_sdist", lambda: None)
    out = tmp_path / "peer.json"
    assert ssm_kernels.main(["--build-conv-peer", str(out)]) == 1
    assert "no causal_conv1d" in out.read_text()
