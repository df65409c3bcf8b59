"""Compile protos/inlaid/v1/*.proto into services/common/pb (generated, git-ignored)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "services" / "common" / "pb"
# protoc writes absolute imports (`from inlaid.v1 import x_pb2`); the stubs live
# under services.common.pb, so the imports are rewritten the way TGI does it.
_IMPORT = re.compile(r"^from inlaid\.v1 import", re.MULTILINE)


def build() -> list[Path]:
    import grpc_tools

    protos = sorted(PROTO_DIR.glob("inlaid/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(OUT_DIR.glob("inlaid/v1/*.py*"))
    for path in generated:
        text = path.read_text()
        path.write_text(_IMPORT.sub("from services.common.pb.inlaid.v1 import", text))
    for pkg in (OUT_DIR, OUT_DIR / "inlaid", OUT_DIR / "inlaid" / "v1"):
        (pkg / "__init__.py").touch()
    return generated


if __name__ == "__main__":
    files = build()
    print(f"generated {len(files)} stub files into {OUT_DIR.relative_to(ROOT)}", file=sys.stderr)
