#!/usr/bin/env python3
"""Write ``.env`` for docker-compose.yml: ``.env.example`` with every empty secret filled at random.

    python docker/generate_env.py [--example .env.example] [--output .env] [--force]

A secret is a variable whose name contains PASSWORD, SECRET or FERNET. Values are hex (no character
needs escaping in a URL or JSON); the Airflow Fernet key has its own format. Non-secret values are
copied as they are. The output is created with mode 0600 and an existing file is never overwritten
without ``--force`` (a new ELASTIC_PASSWORD or database password would not match the existing volumes).
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from pathlib import Path

SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET")
ASSIGNMENT = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
REPO = Path(__file__).resolve().parents[1]


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def new_secret(name: str) -> str:
    """A random value in the format the consumer of ``name`` needs."""
    if name == "AIRFLOW_FERNET_KEY":  # cryptography.fernet.Fernet.generate_key(), without the import
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    # 32 hex characters = 128 bits; MinIO caps secret keys at 40 characters
    return secrets.token_hex(16)


def render(example: str) -> str:
    """The example's text with each empty secret assignment given a fresh value."""
    lines = []
    for line in example.splitlines():
        match = ASSIGNMENT.match(line)
        if match and is_secret(match["name"]) and not match["value"].strip():
            line = f"{match['name']}={new_secret(match['name'])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=REPO / ".env.example")
    parser.add_argument("--output", type=Path, default=REPO / ".env")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        print(f"generate_env: {args.output} exists; keeping it (pass --force to replace it: the running "
              "stack's volumes keep the old passwords)", file=sys.stderr)
        return 1
    text = render(args.example.read_text())
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(args.output, 0o600)
    print(f"generate_env: wrote {args.output} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
