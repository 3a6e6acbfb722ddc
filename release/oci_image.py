#!/usr/bin/env python3
"""Packs the apisec .wasm as an OCI image, without a container engine, reproducibly.

The image follows the *compat* variant of the Wasm image specification, which Istio's
WasmPlugin and Envoy Gateway's EnvoyExtensionPolicy both pull, and which ordinary registry tools
(skopeo, oras, crane, docker) copy like any image:
  - one layer, `application/vnd.oci.image.layer.v1.tar+gzip`, a tar holding only `plugin.wasm`;
  - the manifest annotation `module.wasm.image/variant: compat`;
  - an OCI image config whose rootfs names the layer's uncompressed digest.

Reproducible: the tar has fixed owner, mode and time; gzip has no name and time 0; every JSON
document is written with sorted keys and no spaces. The same .wasm gives the same layer,
config and manifest digests, on any machine, any day.

    python release/oci_image.py WASM --tag 0.1.0 --out dist/apisec-filter-0.1.0.oci.tar

writes an `oci-archive` (a tar of an OCI image layout) and prints the manifest digest. Push it:
    skopeo copy oci-archive:dist/apisec-filter-0.1.0.oci.tar:0.1.0 docker://REGISTRY/apisec-filter:0.1.0
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A tar of regular files and directories (name, data, mode; data None for a directory)
    with everything but name, size and mode fixed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build(wasm: bytes, version: str) -> tuple[dict[str, bytes], dict, str]:
    """The image's blobs (digest -> bytes), its manifest, and the manifest digest."""
    layer_tar = _tar([("plugin.wasm", wasm, 0o644)])
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    config = canonical({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    })
    annotations = {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.title": "apisec-filter",
        "org.opencontainers.image.description": "apisec: API security gateway filter for Envoy (proxy-wasm)",
    }
    # No build time and no source revision: the digest depends on the .wasm and the version only.
    annotations["org.opencontainers.image.version"] = version
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": digest(layer), "size": len(layer)}],
        "annotations": annotations,
    }
    manifest_bytes = canonical(manifest)
    blobs = {digest(layer): layer, digest(config): config, digest(manifest_bytes): manifest_bytes}
    return blobs, manifest, digest(manifest_bytes)


def oci_archive(blobs: dict[str, bytes], manifest_digest: str, tag: str) -> bytes:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as one tar: skopeo's and
    podman's `oci-archive:` transport."""
    index = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_digest,
            "size": len(blobs[manifest_digest]),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    })
    entries = [("blobs", None, 0o755), ("blobs/sha256", None, 0o755)]
    entries += [(f"blobs/sha256/{d.split(':', 1)[1]}", blobs[d], 0o644) for d in sorted(blobs)]
    entries += [("index.json", index, 0o644), ("oci-layout", canonical({"imageLayoutVersion": "1.0.0"}), 0o644)]
    return _tar(entries)


def wasm_from_archive(archive: bytes, tag: str | None = None) -> tuple[bytes, str]:
    """plugin.wasm and the manifest digest from an oci-archive (for the round-trip test and for
    checking a pulled image by hand)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            if f is None:
                raise ValueError(f"{name}: not a file")
            return f.read()

        index = json.loads(read("index.json"))
        entry = next(m for m in index["manifests"]
                     if tag is None or m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
        mdigest = entry["digest"]
        manifest = json.loads(read(f"blobs/sha256/{mdigest.split(':', 1)[1]}"))
        (layer,) = manifest["layers"]
        if layer["mediaType"] != LAYER_TYPE:
            raise ValueError(f"unexpected layer type {layer['mediaType']}")
        data = gzip.decompress(read(f"blobs/sha256/{layer['digest'].split(':', 1)[1]}"))
    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
        f = inner.extractfile("plugin.wasm")
        if f is None:
            raise ValueError("layer has no plugin.wasm")
        return f.read(), mdigest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wasm")
    ap.add_argument("--tag", required=True, help="the reference name inside the archive (the version)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    wasm = Path(args.wasm).read_bytes()
    blobs, _, mdigest = build(wasm, args.tag)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(oci_archive(blobs, mdigest, args.tag))
    print(mdigest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
