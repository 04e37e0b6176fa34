#!/usr/bin/env bash
# Regenerates the Python code for criserver's protocols (`make proto`).
#   CRI v1 (runtime.v1):  proto/runtime/v1/api.proto -> criserver/api/runtime/v1/api_pb2.py
#   admin calls:          proto/admin/v1/admin.proto -> criserver/api/admin/v1/admin_pb2.py
#   agent protocol:       proto/agent.proto          -> vmagent/api/agent_pb2.py, agent_grpc.py
#   IRI (IronCore):       proto/iri/{meta,event,machine}/v1alpha1/api.proto
#                                                    -> criserver/api/iri/<name>/v1alpha1/api_pb2.py
# Usage: proto/generate.sh [OUTPUT_ROOT]   (default: the repository; CI points it at a temp dir
# and diffs, so stale generated code fails the build)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo}
python=${PYTHON:-$repo/.venv/bin/python}
cd "$repo"

mkdir -p "$out/criserver/api/runtime/v1" "$out/criserver/api/admin/v1" "$out/vmagent/api"
"$python" -m grpc_tools.protoc -I proto --python_out="$out/criserver/api" \
    --pyi_out="$out/criserver/api" runtime/v1/api.proto \
    admin/v1/admin.proto

# IRI: its proto root is proto/iri (imports read "meta/v1alpha1/api.proto"), so protoc writes
# top-level imports (`from meta.v1alpha1 import api_pb2`); they are rewritten to the package.
iri_out="$out/criserver/api/iri"
for name in meta event machine; do
    mkdir -p "$iri_out/$name/v1alpha1"
    touch "$iri_out/__init__.py" "$iri_out/$name/__init__.py" "$iri_out/$name/v1alpha1/__init__.py"
done
"$python" -m grpc_tools.protoc -I proto/iri --python_out="$iri_out" --pyi_out="$iri_out" \
    meta/v1alpha1/api.proto event/v1alpha1/api.proto machine/v1alpha1/api.proto
sed -i -E 's/^from (meta|event)\.v1alpha1 import /from criserver.api.iri.\1.v1alpha1 import /' \
    "$iri_out"/*/v1alpha1/api_pb2.py "$iri_out"/*/v1alpha1/api_pb2.pyi

if [ -f proto/agent.proto ]; then
    "$python" -m grpc_tools.protoc -I proto --python_out="$out/vmagent/api" \
        --pyi_out="$out/vmagent/api" \
        --plugin=protoc-gen-grpclib_python="$(dirname "$python")/protoc-gen-grpclib_python" \
        --grpclib_python_out="$out/vmagent/api" agent.proto
    # protoc writes a top-level import; the agent code lives in the vmagent.api package.
    sed -i 's/^import agent_pb2$/from vmagent.api import agent_pb2/' "$out/vmagent/api/agent_grpc.py"
fi
