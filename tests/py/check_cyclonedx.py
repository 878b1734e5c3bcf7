"""Validates a CycloneDX JSON document against the 1.5 schema, strictly (no unknown
properties), with the reference library; prints the errors and exits 1 if any.

Usage: check_cyclonedx.py FILE
"""

import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        document = f.read()
    errors = JsonStrictValidator(SchemaVersion.V1_5).validate_str(document, all_errors=True)
    if errors is None:
        print("valid CycloneDX 1.5")
        return 0
    for error in errors:
        # The schema error's message and where, not the whole schema.
        detail = error.data
        where = "/".join(str(p) for p in getattr(detail, "absolute_path", []))
        print(f"invalid at /{where}: {getattr(detail, 'message', detail)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
