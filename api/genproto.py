"""Generate Python code for the project's own .proto files.

Run by the package build (``setup.py``) and by ``make proto``; the generated modules live in ``api/gen/``
and import each other as ``istiopy.api.gen.*`` (protoc's virtual path mapping gives them that prefix).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
GEN_DIR = HERE / "gen"
VIRTUAL = "istiopy/api/gen"


def generate(out_dir: Path = GEN_DIR) -> list[Path]:
    """Compile every ``api/proto/*.proto`` into ``out_dir``; return the written files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL}={PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[f"{VIRTUAL}/{p.name}" for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {[p.name for p in protos]}")
        produced = Path(tmp) / VIRTUAL
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(produced.iterdir()):
            target = out_dir / f.name
            shutil.copyfile(f, target)
            written.append(target)
        (out_dir / "__init__.py").write_text(
            '"""Generated protobuf code (api/genproto.py); do not edit."""\n'
        )
        (out_dir / "py.typed").write_text("")
    return written


if __name__ == "__main__":
    files = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else GEN_DIR)
    print(f"generated {len(files)} files in {files[0].parent if files else GEN_DIR}")
