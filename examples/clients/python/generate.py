"""Generates the Python gRPC stubs from the project's proto with grpc_tools.protoc.

    python generate.py [OUT_DIR]

OUT_DIR defaults to ``_generated/`` next to this file (gitignored), or to
``$TOKEN_BROKER_STUBS_DIR`` when set. The proto is read from ``../../../proto``
(this repository), or from ``$TOKEN_BROKER_PROTO_DIR`` when set. The client
module calls ``ensure_stubs()`` on import, so running this by hand is optional;
stubs are regenerated whenever the proto or grpcio-tools changes.
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "token_broker/v1/token_broker.proto"


def proto_dir():
    return os.environ.get("TOKEN_BROKER_PROTO_DIR") or os.path.normpath(
        os.path.join(HERE, "..", "..", "..", "proto")
    )


def default_out_dir():
    return os.environ.get("TOKEN_BROKER_STUBS_DIR") or os.path.join(HERE, "_generated")


def _fingerprint(src):
    import grpc_tools

    h = hashlib.sha256()
    with open(os.path.join(src, PROTO), "rb") as f:
        h.update(f.read())
    h.update(getattr(grpc_tools, "__version__", "").encode())
    h.update(os.path.dirname(grpc_tools.__file__).encode())
    return h.hexdigest()


def generate(out_dir=None):
    """Runs protoc into out_dir; returns out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = out_dir or default_out_dir()
    src = proto_dir()
    if not os.path.isfile(os.path.join(src, PROTO)):
        raise FileNotFoundError(
            f"{PROTO} not found under {src}; set TOKEN_BROKER_PROTO_DIR to the repository's proto/ directory"
        )
    os.makedirs(out_dir, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO,
        ]
    )
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}")
    with open(os.path.join(out_dir, ".fingerprint"), "w") as f:
        f.write(_fingerprint(src))
    return out_dir


def ensure_stubs(out_dir=None):
    """Generates the stubs unless up to date, and puts them on sys.path."""
    out_dir = out_dir or default_out_dir()
    try:
        with open(os.path.join(out_dir, ".fingerprint")) as f:
            fresh = f.read() == _fingerprint(proto_dir())
    except OSError:
        fresh = False
    if not fresh:
        generate(out_dir)
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    return out_dir


if __name__ == "__main__":
    out = generate(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"generated {PROTO} stubs in {out}")
