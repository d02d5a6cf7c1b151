"""Validates custom resources against the openAPIV3Schema of their CustomResourceDefinition.

kubernetes-validate knows the built-in kinds only; this checks Latch's own (AuthorizationPolicy)
with jsonschema, which kubernetes-validate depends on. Usage: validate_crs.py CRD.yaml FILE...
Prints one line per resource; exits 1 when any fails.
"""

import sys

import jsonschema
import yaml


def main():
    crd_path, *files = sys.argv[1:]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schemas = {
        f"{group}/{version['name']}": version["schema"]["openAPIV3Schema"]
        for version in crd["spec"]["versions"]
    }
    failed = checked = 0
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != kind:
                    continue
                checked += 1
                name = doc.get("metadata", {}).get("name")
                schema = schemas.get(doc.get("apiVersion"))
                if schema is None:
                    print(f"ERROR {path} {kind}/{name}: apiVersion {doc.get('apiVersion')} is not served")
                    failed += 1
                    continue
                errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
                for error in errors:
                    where = ".".join(str(p) for p in error.absolute_path)
                    print(f"ERROR {path} {kind}/{name}: {where}: {error.message}")
                failed += bool(errors)
                if not errors:
                    print(f"INFO {path} {kind}/{name} passed")
    if checked == 0:
        print(f"ERROR no {kind} found in {files}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
