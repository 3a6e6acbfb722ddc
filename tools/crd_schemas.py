#!/usr/bin/env python3
"""Turns the Kubernetes CustomResourceDefinitions that apisec's manifests use into JSON Schemas
(deploy/schemas/KIND-VERSION.json) that `check-jsonschema` validates the rendered manifests
against (tests/test_render.py), offline. Each schema is the CRD's own openAPIV3Schema for that
version, with `apiVersion` and `kind` pinned, descriptions dropped (size), and, as a cluster's
structural-schema pruning would silently drop them, unknown fields refused: an object with
`properties` and no `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.

Run by hand when the CRDs are updated, with the CRD files from the projects' releases:
    python3 tools/crd_schemas.py OUT_DIR CRD.yaml... --only WasmPlugin/v1alpha1 ...
and record the source and version in deploy/schemas/README.md."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def strict(node):
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if k != "description"}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("crds", nargs="+")
    ap.add_argument("--only", action="append", required=True, help="KIND/VERSION to write")
    args = ap.parse_args()
    wanted = set(args.only)
    for path in args.crds:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            kind = spec["names"]["kind"]
            for version in spec["versions"]:
                if f"{kind}/{version['name']}" not in wanted:
                    continue
                schema = strict(version["schema"]["openAPIV3Schema"])
                props = schema.setdefault("properties", {})
                props["apiVersion"] = {"const": f"{spec['group']}/{version['name']}"}
                props["kind"] = {"const": kind}
                props.setdefault("metadata", {"type": "object"})
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
                schema["$schema"] = "http://json-schema.org/draft-07/schema#"
                schema["title"] = f"{kind} {spec['group']}/{version['name']}"
                out = Path(args.out) / f"{kind.lower()}-{version['name']}.json"
                out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
                print(out, out.stat().st_size)
                wanted.discard(f"{kind}/{version['name']}")
    if wanted:
        raise SystemExit(f"not found: {sorted(wanted)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
